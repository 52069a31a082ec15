"""Running the app under uvicorn: refusals from the headers and admitted predictions answered directly in the HTTP
protocol itself, a graceful drain on SIGTERM/SIGINT.

This is the one module that depends on uvicorn's internals (its httptools protocol and request cycle; the version
range is pinned in pyproject.toml and checked by tests/unit/test_uvicorn_contract.py). The app itself stays a
plain ASGI app, correct under any ASGI server.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import math
import signal
import socket
import time
from dataclasses import dataclass
from http import HTTPStatus
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message
from uvicorn.logging import TRACE_LOG_LEVEL
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.utils import get_local_addr, get_remote_addr, is_ssl

from photoz.service.app import create_app
from photoz.service.errors import QueueFull
from photoz.service.ingest import BODY, DISCONNECT_CANCELS, INLINE_BYTES, stalled
from photoz.service.routes import Handler, prediction_handler, render_error
from photoz.service.settings import Settings
from photoz.service.state import RESERVATION, ServiceState, release_reservation
from photoz.service.workers import BalancedAcceptor, Listener

log = logging.getLogger("photoz.service")

#: Held refusals go out on ticks of this many seconds, together (one wake-up of the loop for many refusals).
REFUSAL_TICK_S = 0.5
#: Seconds uvicorn waits beyond the drain timeout, for the 503s of work cut off at the deadline to go out.
ANSWER_GRACE_S = 5


@functools.cache
def _status_line(status: int) -> bytes:
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
    return f"HTTP/1.1 {status} {phrase}".encode("latin-1")


def raw_response(response: Response, close: bool = True, extra: list[tuple[bytes, bytes]] | None = None) -> bytes:
    """A complete HTTP/1.1 response: status line, ``extra`` headers (the server's defaults), the response's,
    ``Connection: close`` when ``close``, body."""
    head = [_status_line(response.status_code)]
    head += [name + b": " + value for name, value in (extra or [])]
    head += [name + b": " + value for name, value in response.raw_headers if name != b"connection"]
    return b"\r\n".join([*head, *([b"connection: close"] if close else []), b"", b""]) + bytes(response.body)


def _asks_to_close(response: Response) -> bool:
    return any(name == b"connection" and b"close" in value.lower() for name, value in response.raw_headers)


#: Where an admitted prediction answered directly keeps its state (the ASGI scope of its request).
DIRECT = "photoz.direct"


@dataclass
class _Direct:
    """A prediction the protocol answers itself: its handler, the body bytes it counts in flight until the body is
    whole, the timer on the body's progress and then the task that answers it."""

    handler: Handler
    held: int
    started: float
    timer: asyncio.TimerHandle | None = None
    seen: int = 0
    task: asyncio.Task[None] | None = None


class RefusingProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol, refusing an overloaded server's prediction requests itself.

    When :meth:`ServiceState.refusal_for` refuses a request from its request
    line and headers, the refusal never becomes an ASGI request: the socket
    stops being read (its body stays in the kernel), a timer holds the 429
    (``begin_hold``) and then writes it and closes the connection. No task,
    no Request, no middleware: under a retry storm a refusal costs the parse
    of its headers and the bytes of its answer.

    An admitted prediction with a small body of declared length (at most
    :data:`~photoz.service.ingest.INLINE_BYTES`, and the body limit) is
    answered directly too: the protocol reads its body whole (within the
    body's progress deadline and the in-flight bound, as the ASGI path does),
    then runs the route table's handler on it and writes the response in one
    piece, skipping the ASGI messages, the middleware and the app's dispatch,
    and a client that goes away has the request's task cancelled (its queued
    work dropped) without a task watching for it. Pipelining, keep-alive,
    shutdown and everything else stay uvicorn's: the request keeps its
    uvicorn request cycle, whose state says when the response is complete.
    """

    state: ServiceState  # set on the subclass serve() makes
    app_for_handlers: FastAPI  # the app whose handlers the direct path runs (set there too)
    refusal: bytes | None = None  # the answer being held; the connection closes after it
    refusal_timer: asyncio.TimerHandle | None = None

    addresses_known: bool = False
    acceptor: BalancedAcceptor | None = None  # a worker's, counting its open connections (set by run_server)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """uvicorn's, less its look-up of both ends' addresses, which waits for a request that is admitted
        (:meth:`_learn_addresses`): on uvloop each look-up builds and detaches a socket object, and the two
        were 28% of a refusal's py-spy samples (2026-12-07). The contract test holds this to uvicorn's."""
        self.connections.add(self)
        self.transport = transport
        self.flow = FlowControl(transport)
        self.scheme = "https" if is_ssl(transport) else "http"
        if self.logger.level <= TRACE_LOG_LEVEL:  # uvicorn's trace line names the client
            self._look_up_addresses()
            prefix = f"{self.client[0]}:{self.client[1]} - " if self.client else ""
            self.logger.log(TRACE_LOG_LEVEL, "%sHTTP connection made", prefix)

    def _look_up_addresses(self) -> None:
        if not self.addresses_known:
            self.server, self.client = get_local_addr(self.transport), get_remote_addr(self.transport)
            self.addresses_known = True

    def _learn_addresses(self) -> None:
        """Both ends' addresses, as uvicorn's connection_made looks them up, into the protocol and its scope."""
        self._look_up_addresses()
        self.scope["server"], self.scope["client"] = self.server, self.client

    def on_message_begin(self) -> None:
        if self.refusal is None:  # requests pipelined behind a refused one are never answered: the socket closes
            super().on_message_begin()

    def on_headers_complete(self) -> None:
        if self.refusal is not None:
            return
        path = self.url.split(b"?", 1)[0]
        exc = self.state.refusal_for(self.parser.get_method(), path, self.headers)
        if not isinstance(exc, QueueFull):
            self._learn_addresses()
            if exc is not None:  # admitted: the reservation travels with the request (released by its handler)
                self.scope[RESERVATION] = exc  # type: ignore[literal-required]
                self._maybe_direct(path)
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
        if self.refusal is not None:
            return
        if DIRECT in self.cycle.scope:  # read whole here (at most the declared length): no pause for a reader
            self.cycle.body += body
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self.refusal is not None:
            return
        super().on_message_complete()
        direct: _Direct | None = self.cycle.scope.get(DIRECT)  # type: ignore[assignment]
        if direct is not None and direct.timer is not None:  # its turn came (not pipelined behind another)
            self._run_direct(self.cycle, direct)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.acceptor is not None:
            self.acceptor.closed()
        if self.refusal_timer is not None:  # the client left while its refusal was held
            self.refusal_timer.cancel()
            self.refusal_timer = None
            self.state.end_hold()
        for cycle, _ in self.pipeline:  # pipelined requests that will never run hold no reservation
            self._abandon(cycle)
        if self.cycle is not None and not self.cycle.response_complete:
            direct: _Direct | None = self.cycle.scope.get(DIRECT)  # type: ignore[assignment]
            if direct is not None and direct.task is not None:  # its queued work is dropped; 499 counted
                direct.task.cancel()
            elif direct is not None:  # its body never came whole
                self._abandon(self.cycle)
        super().connection_lost(exc)

    # -- predictions answered directly ------------------------------------------------------------------

    def _maybe_direct(self, path: bytes) -> None:
        """Mark an admitted prediction for the direct path when it qualifies (else the ASGI path takes it)."""
        handler = prediction_handler(path.decode("latin-1"))
        length = next((v for n, v in self.headers if n == b"content-length"), b"")
        if handler is None or not length.isdigit() or self.expect_100_continue or self.parser.should_upgrade() \
                or self.limit_concurrency is not None or any(n == b"transfer-encoding" for n, _ in self.headers):
            return
        declared = int(length)
        if declared > min(INLINE_BYTES, self.state.settings.max_body_bytes) or not self.state.inflight.take(declared):
            return  # the ASGI path gives the 413 or 429 (or reads a large body in a thread)
        self.scope[DIRECT] = _Direct(handler, declared, time.perf_counter())  # type: ignore[literal-required]
        self.scope[DISCONNECT_CANCELS] = True  # type: ignore[literal-required]

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        """uvicorn starts a request's task here (at once, or when the one before on the connection is answered)."""
        direct: _Direct | None = cycle.scope.get(DIRECT)  # type: ignore[assignment]
        if direct is None:
            super()._start_asgi_task(cycle, app)
        elif not cycle.more_body:
            self._run_direct(cycle, direct)
        else:  # answered when its body is whole, or 408 when it stops arriving
            timeout = self.state.settings.body_timeout_s
            direct.timer = self.loop.call_later(timeout, self._check_progress, cycle, direct, timeout)

    def _check_progress(self, cycle: RequestResponseCycle, direct: _Direct, timeout: float) -> None:
        if len(cycle.body) > direct.seen:
            direct.seen = len(cycle.body)
            direct.timer = self.loop.call_later(timeout, self._check_progress, cycle, direct, timeout)
            return
        direct.timer = None
        self._abandon(cycle)
        self.state.observe(408, direct.started)
        if not self.transport.is_closing():
            self.transport.write(raw_response(render_error(cycle.scope["path"], stalled(timeout, len(cycle.body)))))
            self.transport.close()

    def _end_direct(self, cycle: RequestResponseCycle) -> None:
        """The body is whole or will never be: stop its timer, stop counting it in flight."""
        direct: _Direct | None = cycle.scope.get(DIRECT)  # type: ignore[assignment]
        if direct is None:
            return
        if direct.timer is not None:
            direct.timer.cancel()
            direct.timer = None
        self.state.inflight.give_back(direct.held)
        direct.held = 0

    def _abandon(self, cycle: RequestResponseCycle) -> None:
        """A request that will never run: its body stops counting in flight, its admission's reservation goes."""
        self._end_direct(cycle)
        release_reservation(cycle.scope)  # type: ignore[arg-type]

    def _run_direct(self, cycle: RequestResponseCycle, direct: _Direct) -> None:
        self._end_direct(cycle)
        cycle.scope[BODY] = bytes(cycle.body)  # type: ignore[literal-required]
        cycle.body = bytearray()
        cycle.scope["app"] = self.app_for_handlers  # type: ignore[typeddict-unknown-key]
        direct.task = task = self.loop.create_task(self._answer(cycle, direct.handler))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    async def _answer(self, cycle: RequestResponseCycle, handler: Handler) -> None:
        try:  # the handlers render every error themselves; anything else is a bug, answered 500 as uvicorn would
            response = await handler(Request(cycle.scope, _nothing_more))  # type: ignore[arg-type]
        except Exception:
            log.exception("prediction request failed")
            response = Response("Internal Server Error", status_code=500, headers={"Connection": "close"})
        if cycle.disconnected or self.transport.is_closing():
            return
        close = not cycle.keep_alive or _asks_to_close(response)
        self.transport.write(raw_response(response, close, self.server_state.default_headers))
        cycle.response_started = cycle.response_complete = True
        cycle.message_event.set()
        if close:
            self.transport.close()
        cycle.on_response()


async def _nothing_more() -> Message:
    """The receive of a request whose body the protocol read (:data:`~photoz.service.ingest.BODY`): nothing to
    receive; it waits until the task is cancelled (the client went away)."""
    await asyncio.get_running_loop().create_future()
    return {"type": "http.disconnect"}


class DrainingServer(uvicorn.Server):
    """On SIGTERM: mark the service draining (readyz 503, new predictions 503), then let
    uvicorn stop accepting connections, finish in-flight requests and run the lifespan shutdown."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, acceptor: BalancedAcceptor | None = None) -> None:
        super().__init__(config)
        self.photoz_app, self.acceptor = app, acceptor

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's; a worker (with an acceptor) accepts on its shared socket itself, balancing connections."""
        self._loop = asyncio.get_running_loop()
        if self.acceptor is None:
            await super().startup(sockets)
            return
        await super().startup([])  # the lifespan, and no server of uvicorn's
        if self.started:
            await self.acceptor.start(self._create_protocol)

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's once-per-0.1 s tick; once a second, the open connections into ``photoz_open_connections`` (per
        worker: whether the workers share them)."""
        engine = self.photoz_app.state.photoz.engine
        if counter % 10 == 0 and engine is not None:
            engine.metrics.open_connections.set(len(self.server_state.connections))
        return await super().on_tick(counter)

    def _create_protocol(self) -> asyncio.Protocol:
        """A connection's protocol, made as uvicorn's startup makes it."""
        config = self.config
        return config.http_protocol_class(  # type: ignore[call-arg]
            config=config, server_state=self.server_state, app_state=self.lifespan.state, _loop=self._loop)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.acceptor is not None:
            self.acceptor.stop()
        await super().shutdown(sockets)

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


def run_worker(settings: Settings, listener: Listener) -> None:
    """One worker process of a supervisor (:mod:`photoz.service.workers`): a whole server on the shared socket."""
    name = f"%(name)s[w{listener.index}]"
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT.replace("%(name)s", name))
    raise SystemExit(run_server(settings, listener))


def run_server(settings: Settings, listener: Listener | None = None) -> int:
    """The app under uvicorn with photoz's protocol and drain; a worker's (``listener``) accepting on the shared
    socket in balance with the other workers, else on its own."""
    app = create_app(settings)
    acceptor = BalancedAcceptor(listener) if listener is not None else None
    protocol = type("PhotozHttpProtocol", (RefusingProtocol,),
                    {"state": app.state.photoz, "app_for_handlers": app, "acceptor": acceptor})
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s) + ANSWER_GRACE_S,
                            access_log=False, http=protocol)
    server = DrainingServer(config, app, acceptor)
    # uvicorn re-raises the stop signal after its graceful shutdown; a drain
    # that finished is a clean stop, so the process exits 0 rather than -15
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run(sockets=[listener.sock] if listener is not None else None)
    return 0 if server.started else 1
