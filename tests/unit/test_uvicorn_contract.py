"""The one place photoz depends on uvicorn's internals (photoz.service.server.RefusingProtocol, a subclass of
uvicorn's httptools protocol) against the installed uvicorn: its version is in the range pyproject.toml pins, and
the protocol refuses from the headers and admits otherwise, driven with raw bytes over a fake transport. An
incompatible uvicorn fails here, loudly, before any server test."""
import asyncio
from importlib.metadata import requires

import pytest
import uvicorn
from packaging.requirements import Requirement
from packaging.version import Version

from photoz.service.errors import QueueFull
from photoz.service.server import RefusingProtocol


def test_installed_uvicorn_is_in_the_pinned_range():
    pins = [Requirement(d) for d in requires("photoz") or []]  # the installed photoz's own (pyproject.toml's)
    [uvicorn_pin] = [r for r in pins if r.name == "uvicorn" and r.marker is None]
    assert any(spec.operator in ("<", "<=") for spec in uvicorn_pin.specifier), "uvicorn needs an upper bound"
    assert Version(uvicorn.__version__) in uvicorn_pin.specifier, (uvicorn.__version__, str(uvicorn_pin.specifier))


class FakeTransport(asyncio.Transport):
    def __init__(self):
        super().__init__()
        self.written, self.closed, self.paused = b"", False, False

    def write(self, data):
        self.written += data

    def close(self):
        self.closed = True

    def is_closing(self):
        return self.closed

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8000)}.get(name, default)


class StubState:
    """What RefusingProtocol asks of the service: refuse POSTs to /v1/predict, admit everything else."""

    def __init__(self):
        self.asked = []

    def refusal_for(self, method, path, headers):
        self.asked.append((method, path, dict(headers).get(b"x-photoz-objects")))
        return QueueFull(10, 10, 3.0, close=True) if path == b"/v1/predict" else None

    def begin_hold(self):
        return 0.0

    def end_hold(self):
        pass


@pytest.mark.parametrize(("path", "refused"), [(b"/v1/predict", True), (b"/healthz", False)])
def test_the_protocol_refuses_from_the_headers_and_admits_otherwise(path, refused):
    called = []

    async def app(scope, receive, send):
        called.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main():
        state = StubState()
        protocol_class = type("P", (RefusingProtocol,), {"state": state})
        config = uvicorn.Config(app, http=protocol_class, log_level="warning", lifespan="off")
        config.load()
        from uvicorn.server import ServerState

        protocol = config.http_protocol_class(config=config, server_state=ServerState(), app_state={})
        transport = FakeTransport()
        protocol.connection_made(transport)
        protocol.data_received(b"POST " + path + b"?x=1 HTTP/1.1\r\nHost: a\r\nX-Photoz-Objects: 3\r\n"
                               b"Content-Length: 4\r\n\r\nbody")
        for _ in range(20):
            await asyncio.sleep(0.01)
        protocol.connection_lost(None)
        return state, transport

    state, transport = asyncio.run(main())
    assert state.asked == [(b"POST", path, b"3")]  # the request line and headers reached refusal_for, query cut
    if refused:
        assert transport.written.startswith(b"HTTP/1.1 429 Too Many Requests") and transport.closed
        assert b"retry-after: 3" in transport.written.lower() and called == []
    else:
        assert transport.written.startswith(b"HTTP/1.1 200") and called == [path.decode()]
