"""The one route table: which requests predict, which protocol speaks at a path, how that protocol writes errors.

photoz speaks two protocols over one request core (:mod:`photoz.service.state`): its own REST API under ``/v1``
and the Open Inference Protocol (KServe v2, Triton) under ``/v2``. Each is an adapter: the path its predictions
take and the form of its errors here; how its body becomes cutouts and its results a body in its own module
(:mod:`photoz.service.app`, :mod:`photoz.service.oip`), which binds its handler to this table's entry. Everything
that asks "is this a prediction" or "whose error form" asks here: admission from the headers (the uvicorn
protocol and the ASGI path alike), the app's dispatch ahead of FastAPI, and the error handlers.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
from starlette.requests import Request
from starlette.responses import Response

from photoz.service.errors import problem_for, problem_parts

Handler = Callable[[Request], Awaitable[Response]]


def oip_error(exc: BaseException) -> Response:
    """The Open Inference Protocol's error document (``{"error": "..."}``) with the status and headers ``/v1``
    would give."""
    problem, headers = problem_parts(exc)
    return Response(orjson.dumps({"error": problem["detail"]}), status_code=problem["status"], headers=headers,
                    media_type="application/json")


@dataclass(frozen=True)
class Protocol:
    """One protocol: its path prefix, its prediction paths (templates, as the declared routes take them: the
    fast dispatch matches the same paths) and its error form."""

    name: str
    prefix: str
    predict_paths: tuple[str, ...]
    render_error: Callable[[BaseException], Response]

    def match_prediction(self, path: str) -> re.Match[str] | None:
        """The match of ``path`` against one of the prediction paths (``{name}``: one path segment), or None."""
        for pattern in _patterns(self.predict_paths):
            match = pattern.fullmatch(path)
            if match is not None:
                return match
        return None

    def speaks(self, path: str) -> bool:
        return path == self.prefix or path.startswith(self.prefix + "/")


@functools.cache
def _patterns(templates: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    return tuple(re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(t))) for t in templates)


V1 = Protocol("v1", "/v1", ("/v1/predict",), problem_for)
V2 = Protocol("v2", "/v2", ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"), oip_error)
PROTOCOLS: tuple[Protocol, ...] = (V1, V2)

#: The POST handler of each protocol's prediction path, bound by the module that implements it.
HANDLERS: dict[str, Handler] = {}


def bind(protocol: Protocol, handler: Handler) -> None:
    HANDLERS[protocol.name] = handler


@functools.lru_cache(maxsize=1024)
def prediction_protocol(path: str) -> Protocol | None:
    """The protocol whose prediction path ``path`` is (POST requests), else None (answers for the last 1,024
    paths kept: most requests ask about the same few)."""
    for protocol in PROTOCOLS:
        if protocol.match_prediction(path) is not None:
            return protocol
    return None


def prediction_handler(path: str) -> Handler | None:
    protocol = prediction_protocol(path)
    return HANDLERS.get(protocol.name) if protocol is not None else None


def is_prediction_path(path: bytes) -> bool:
    """The same question from a request line's raw path (bytes, before any ASGI scope exists)."""
    return prediction_protocol(path.decode("latin-1")) is not None


def render_error(path: str, exc: BaseException) -> Response:
    """``exc`` in the error form of the protocol spoken at ``path`` (``/v1``'s RFC 9457 problem elsewhere)."""
    for protocol in PROTOCOLS:
        if protocol.speaks(path):
            return protocol.render_error(exc)
    return problem_for(exc)
