"""Running the app under uvicorn with a graceful drain on SIGTERM/SIGINT."""
from __future__ import annotations

import asyncio
import logging
import math
import signal
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI

from photoz.service.app import create_app
from photoz.service.settings import Settings

#: Seconds uvicorn waits beyond the drain timeout, for the 503s of work cut off at the deadline to go out.
ANSWER_GRACE_S = 5


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


def serve(settings: Settings) -> int:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s) + ANSWER_GRACE_S,
                            access_log=False)
    server = DrainingServer(config, app)
    # uvicorn re-raises the stop signal after its graceful shutdown; a drain
    # that finished is a clean stop, so the process exits 0 rather than -15
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    return 0 if server.started else 1
