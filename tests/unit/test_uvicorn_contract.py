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
        self.asked_for = []

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
        self.asked_for.append(name)
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
        called.append((scope["path"], scope["client"], scope["server"]))
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
        # a refusal never looks up the connection's addresses (on uvloop a third of its CPU)
        assert not {"socket", "peername", "sockname"} & set(transport.asked_for), transport.asked_for
    else:
        assert transport.written.startswith(b"HTTP/1.1 200")
        assert called == [(path.decode(), ("127.0.0.1", 5000), ("127.0.0.1", 8000))]  # as uvicorn's scope has them


def test_connection_made_sets_what_uvicorns_does_but_the_addresses():
    """RefusingProtocol.connection_made is uvicorn's without the address look-up: the same per-connection state
    after it, so a uvicorn that sets something new there fails here."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    async def app(scope, receive, send):
        pass

    async def state_after(protocol_class):  # a protocol needs a running loop
        config = uvicorn.Config(app, http=protocol_class, log_level="warning", lifespan="off")
        config.load()
        protocol = config.http_protocol_class(config=config, server_state=ServerState(), app_state={})
        protocol.connection_made(FakeTransport())
        return {k: v for k, v in vars(protocol).items() if k not in ("transport", "flow", "server", "client")}, \
            protocol

    ours, protocol = asyncio.run(state_after(type("P", (RefusingProtocol,), {"state": StubState()})))
    theirs, reference = asyncio.run(state_after(HttpToolsProtocol))
    assert ours.keys() == theirs.keys()
    plain = (str, bytes, int, float, bool, tuple, type(None))  # the values that are not per-instance objects

    def values(state):
        return {k: v for k, v in state.items() if isinstance(v, plain)}

    assert values(ours) == values(theirs) and "scheme" in values(ours)
    assert protocol in protocol.connections and protocol.flow is not None and protocol.scheme == "http"
    assert reference.server == ("127.0.0.1", 8000) and protocol.server is None  # looked up when admitted


# -- predictions answered directly by the protocol --------------------------------------------------------

class Reservation:
    def __init__(self):
        self.released = 0

    def release(self):
        self.released += 1


class DirectState(StubState):
    """Admits POST /v1/predict with a reservation; the settings, in-flight bound and metrics the direct path uses."""

    def __init__(self, body_timeout_s=5.0, max_body_bytes=1 << 20):
        super().__init__()
        from photoz.service.ingest import InflightBodies

        self.settings = type("S", (), {"body_timeout_s": body_timeout_s, "max_body_bytes": max_body_bytes})()
        self.inflight = InflightBodies(1 << 20)
        self.reservations, self.observed = [], []

    def refusal_for(self, method, path, headers):
        if path != b"/v1/predict":
            return None
        self.reservations.append(Reservation())
        return self.reservations[-1]

    def observe(self, status, started):
        self.observed.append(status)


def drive(state, handler, chunks, settle=20, lose=False):
    """Feed ``chunks`` (raw bytes, one data_received each) to the protocol with ``handler`` bound to /v1; the
    written bytes, whether the transport closed, and what the ASGI app saw."""
    from photoz.service import routes

    asgi_calls = []

    async def app(scope, receive, send):
        asgi_calls.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
        await send({"type": "http.response.body", "body": b"asgi"})

    async def main():
        from uvicorn.server import ServerState

        protocol_class = type("P", (RefusingProtocol,), {"state": state, "app_for_handlers": "the app"})
        config = uvicorn.Config(app, http=protocol_class, log_level="warning", lifespan="off")
        config.load()
        server_state = ServerState()
        server_state.default_headers = [(b"server", b"photoz-test")]  # uvicorn's server sets date and server
        protocol = config.http_protocol_class(config=config, server_state=server_state, app_state={})
        transport = FakeTransport()
        protocol.connection_made(transport)
        for chunk in chunks:
            protocol.data_received(chunk)
            await asyncio.sleep(0.01)
        for _ in range(settle):
            await asyncio.sleep(0.01)
        if lose:
            protocol.connection_lost(None)
            for _ in range(5):
                await asyncio.sleep(0.01)
        return transport

    saved = dict(routes.HANDLERS)
    routes.HANDLERS["v1"] = handler
    try:
        transport = asyncio.run(main())
    finally:
        routes.HANDLERS.clear()
        routes.HANDLERS.update(saved)
    return transport, asgi_calls


def post(body, extra=b""):
    return b"POST /v1/predict?pdf=none HTTP/1.1\r\nHost: a\r\n" + extra + \
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body


def echo_handler(seen):
    from starlette.responses import Response

    from photoz.service.ingest import BODY, DISCONNECT_CANCELS

    async def handler(request):
        seen.append((request.scope[BODY], request.scope.get(DISCONNECT_CANCELS), request.scope["app"],
                     request.query_params.get("pdf")))
        return Response(b"got " + request.scope[BODY][:8], media_type="text/plain")
    return handler


def test_an_admitted_prediction_is_answered_directly_from_its_whole_body_in_one_write():
    state, seen = DirectState(), []
    body = bytes(range(256)) * 300  # 76,800 bytes: more than uvicorn's high-water mark, in three pieces
    request = post(body)
    transport, asgi = drive(state, echo_handler(seen), [request[:100], request[100:40000], request[40000:]])
    assert asgi == [] and len(seen) == 1
    assert seen[0] == (body, True, "the app", "none")  # the whole body, the disconnect cancels, the app, the query
    head, _, rest = transport.written.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"content-length: 12" in head.lower() and rest == b"got " + body[:8]
    assert b"server: photoz-test" in head.lower() and b"connection: close" not in head.lower() and not transport.closed
    assert state.inflight.used == 0  # the body's bytes counted in flight only while it was read


def test_pipelined_direct_predictions_are_answered_in_order_and_other_requests_go_to_the_app():
    state, seen = DirectState(), []
    two = post(b"first...") + post(b"second..") + b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
    transport, asgi = drive(state, echo_handler(seen), [two])
    assert [s[0] for s in seen] == [b"first...", b"second.."] and asgi == ["/healthz"]
    answers = transport.written.split(b"HTTP/1.1 200 OK")
    assert [a.rpartition(b"\r\n\r\n")[2] for a in answers[1:]] == [b"got first...", b"got second..", b"asgi"]


@pytest.mark.parametrize("extra", [b"Expect: 100-continue\r\n", b""])
def test_a_body_too_large_for_the_direct_path_or_expecting_100_continue_goes_to_the_app(extra):
    state, seen = DirectState(max_body_bytes=10 if not extra else 1 << 20), []
    transport, asgi = drive(state, echo_handler(seen), [post(b"0123456789abcdef", extra)])
    assert seen == [] and asgi == ["/v1/predict"] and state.inflight.used == 0


def test_a_body_that_stops_arriving_is_answered_408_and_its_reservation_released():
    state, seen = DirectState(body_timeout_s=0.05), []
    transport, asgi = drive(state, echo_handler(seen), [post(b"x" * 1000)[:-500]], settle=30)
    assert seen == [] and asgi == []
    assert transport.written.startswith(b"HTTP/1.1 408") and transport.closed
    assert state.observed == [408] and state.reservations[0].released == 1 and state.inflight.used == 0


def test_a_client_gone_while_its_prediction_waits_has_the_task_cancelled():
    state, events = DirectState(), []

    async def handler(request):
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            events.append("cancelled")
            raise

    transport, _ = drive(state, handler, [post(b"abc")], settle=5, lose=True)
    assert events == ["cancelled"] and transport.written == b""


@pytest.mark.parametrize(("version", "extra"), [(b"1.0", b""), (b"1.1", b"Connection: close\r\n")])
def test_a_direct_answer_closes_the_connection_when_the_client_asked(version, extra):
    state, seen = DirectState(), []
    request = post(b"abc", extra).replace(b"HTTP/1.1", b"HTTP/" + version, 1)
    transport, _ = drive(state, echo_handler(seen), [request])
    assert len(seen) == 1 and transport.written.startswith(b"HTTP/1.1 200") and transport.closed
    assert b"connection: close" in transport.written.lower()


def test_a_client_gone_mid_body_releases_its_reservation_and_in_flight_bytes():
    state, seen = DirectState(), []
    transport, _ = drive(state, echo_handler(seen), [post(b"x" * 5000)[:-3000]], settle=2, lose=True)
    assert seen == [] and transport.written == b""
    assert state.reservations[0].released == 1 and state.inflight.used == 0


def test_what_a_worker_takes_from_uvicorns_server_is_still_there():
    """A worker (service/workers.py) starts uvicorn's Server with no sockets of its own (``startup([])``: the
    lifespan, no listening server), makes each connection's protocol as uvicorn's startup does (the protocol
    class with config, server_state, app_state and _loop) and counts connections on uvicorn's tick."""
    import inspect

    from uvicorn.server import Server, ServerState

    code = (line.split("#")[0] for line in inspect.getsource(Server.startup).splitlines())  # no comments
    source = "".join("".join(code).split())  # and no blanks
    assert "ifsocketsisnotNone:" in source and "forsockinsockets:" in source
    assert "config.http_protocol_class(config=config,server_state=self.server_state,app_state=self.lifespan.state," \
           "_loop=_loop" in source
    assert inspect.iscoroutinefunction(Server.on_tick)
    assert list(inspect.signature(Server.on_tick).parameters) == ["self", "counter"]
    assert "await self.on_tick(counter)" in inspect.getsource(Server.main_loop)
    assert isinstance(ServerState().connections, set)
