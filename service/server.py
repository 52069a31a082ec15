"""Running the app under uvicorn: refusals from the headers in the HTTP protocol itself, a graceful drain on
SIGTERM/SIGINT."""
from __future__ import annotations

import asyncio
import logging
import math
import signal
import socket
from http import HTTPStatus
from types import FrameType

import uvicorn
from fastapi import FastAPI
from starlette.responses import Response
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from photoz.service.app import create_app
from photoz.service.errors import QueueFull
from photoz.service.routes import render_error
from photoz.service.settings import Settings
from photoz.service.state import RESERVATION, ServiceState, release_reservation

#: Held refusals go out on ticks of this many seconds, together (one wake-up of the loop for many refusals).
REFUSAL_TICK_S = 0.5
#: Seconds uvicorn waits beyond the drain timeout, for the 503s of work cut off at the deadline to go out.
ANSWER_GRACE_S = 5


def raw_response(response: Response) -> bytes:
    """A complete HTTP/1.1 response (status line, the response's headers, ``Connection: close``, body)."""
    head = [f"HTTP/1.1 {response.status_code} {HTTPStatus(response.status_code).phrase}".encode("latin-1")]
    head += [name + b": " + value for name, value in response.raw_headers if name != b"connection"]
    return b"\r\n".join([*head, b"connection: close", b"", b""]) + bytes(response.body)


class RefusingProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol, refusing an overloaded server's prediction requests itself.

    When :meth:`ServiceState.refusal_for` refuses a request from its request
    line and headers, the refusal never becomes an ASGI request: the socket
    stops being read (its body stays in the kernel), a timer holds the 429
    (``begin_hold``) and then writes it and closes the connection. No task,
    no Request, no middleware: under a retry storm a refusal costs the parse
    of its headers and the bytes of its answer. Everything else is uvicorn's.
    """

    state: ServiceState  # set on the subclass serve() makes
    refusal: bytes | None = None  # the answer being held; the connection closes after it
    refusal_timer: asyncio.TimerHandle | None = None

    def on_message_begin(self) -> None:
        if self.refusal is None:  # requests pipelined behind a refused one are never answered: the socket closes
            super().on_message_begin()

    def on_headers_complete(self) -> None:
        if self.refusal is not None:
            return
        path = self.url.split(b"?", 1)[0]
        exc = self.state.refusal_for(self.parser.get_method(), path, self.headers)
        if not isinstance(exc, QueueFull):
            if exc is not None:  # admitted: the reservation travels with the request (released by its handler)
                self.scope[RESERVATION] = exc  # type: ignore[literal-required]
            super().on_headers_complete()
            return
        self.refusal = raw_response(render_error(path.decode("latin-1"), exc))
        self.flow.pause_reading()
        delay = self.state.begin_hold()
        if delay:  # on a tick: refusals due together go out in one pass of the event loop
            due = math.ceil((self.loop.time() + delay) / REFUSAL_TICK_S) * REFUSAL_TICK_S
            self.refusal_timer = self.loop.call_at(due, self._send_refusal, True)
        else:
            self._send_refusal(False)

    def _send_refusal(self, held: bool) -> None:
        self.refusal_timer = None
        if held:
            self.state.end_hold()
        if self.refusal is not None and not self.transport.is_closing():
            self.transport.write(self.refusal)
            self.transport.close()  # unread body bytes are discarded with the socket

    def on_body(self, body: bytes) -> None:
        if self.refusal is None:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self.refusal is None:
            super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refusal_timer is not None:  # the client left while its refusal was held
            self.refusal_timer.cancel()
            self.refusal_timer = None
            self.state.end_hold()
        for cycle, _ in self.pipeline:  # pipelined requests that will never run hold no reservation
            release_reservation(cycle.scope)  # type: ignore[arg-type]
        super().connection_lost(exc)


class DrainingServer(uvicorn.Server):
    """On SIGTERM: mark the service draining (readyz 503, new predictions 503), then let
    uvicorn stop accepting connections, finish in-flight requests and run the lifespan shutdown."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.photoz_app = app

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = self.photoz_app.state.photoz
        if not state.draining:
            logging.getLogger("photoz.service").info("signal %s: draining", sig)
            # work still queued at the drain deadline is answered 503 + Retry-After (uvicorn waits a little
            # longer before it cuts connections), not dropped with a bare 500
            timeout = state.settings.drain_timeout_s
            self._loop.call_soon_threadsafe(self._loop.call_later, timeout, state.cut_off_queued)
        state.draining = True
        super().handle_exit(sig, frame)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def serve(settings: Settings) -> int:
    """``photoz serve``: one server process, or a supervisor of ``settings.worker_count`` worker processes."""
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    from photoz.model.runtime import choose_providers

    gpu = choose_providers(settings.providers)[0] != "CPUExecutionProvider"
    workers = settings.worker_count(gpu=gpu)
    if workers == 1:
        return run_server(settings)
    from photoz.service.workers import Supervisor, worker_settings

    return Supervisor(worker_settings(settings, workers, gpu), workers, run_worker).run()


def run_worker(settings: Settings, sock: socket.socket, index: int) -> None:
    """One worker process of a supervisor (:mod:`photoz.service.workers`): a whole server on the shared socket."""
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT.replace("%(name)s", f"%(name)s[w{index}]"))
    raise SystemExit(run_server(settings, sock))


def run_server(settings: Settings, sock: socket.socket | None = None) -> int:
    """The app under uvicorn with photoz's protocol and drain, on ``sock`` if given (a worker), else its own."""
    app = create_app(settings)
    protocol = type("PhotozHttpProtocol", (RefusingProtocol,), {"state": app.state.photoz})
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s) + ANSWER_GRACE_S,
                            access_log=False, http=protocol)
    server = DrainingServer(config, app)
    # uvicorn re-raises the stop signal after its graceful shutdown; a drain
    # that finished is a clean stop, so the process exits 0 rather than -15
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run(sockets=[sock] if sock is not None else None)
    return 0 if server.started else 1
