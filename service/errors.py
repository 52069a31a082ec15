"""Every error the service answers with, mapped to its HTTP status in one place.

Client mistakes are :class:`~photoz.formats.errors.InputError` (4xx, naming the
field, what was expected and what arrived); the service's own refusals are
:class:`ServiceError` subclasses (401, 429, 503, 504). :func:`problem_for`
turns any exception into an RFC 9457 problem document: Starlette's HTTP
errors keep their status, and anything unexpected is a 500 that carries a
request id and no internals (the traceback goes to the log under that id).
"""
from __future__ import annotations

import logging
import uuid
from typing import Any

import orjson
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from photoz.formats.errors import InputError

log = logging.getLogger("photoz.service")

PROBLEM_TYPE = "application/problem+json"


class ServiceError(Exception):
    """A refusal by the service itself: ``status``, ``title`` and the headers that go with it."""

    status = 500
    title = "error"

    def headers(self) -> dict[str, str] | None:
        return None


class Unauthorized(ServiceError):
    status, title = 401, "unauthorized"

    def __init__(self) -> None:
        super().__init__("a valid API key is required: Authorization: Bearer <key>")

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Overloaded(ServiceError):
    """429: try again after ``retry_after_s``; ``close`` when the body was not read (the connection must go)."""

    status, title = 429, "overloaded"

    def __init__(self, detail: str, retry_after_s: float, close: bool = False) -> None:
        super().__init__(detail)
        self.retry_after_s, self.close = retry_after_s, close

    def headers(self) -> dict[str, str]:
        headers = {"Retry-After": f"{max(1, round(self.retry_after_s))}"}
        return {**headers, "Connection": "close"} if self.close else headers


class QueueFull(Overloaded):
    def __init__(self, queued: int, capacity: int, retry_after_s: float, close: bool = False,
                 why: str | None = None) -> None:
        why = why or f"queue holds {queued} of {capacity} cutouts"
        super().__init__(f"{why}; retry in {max(1, round(retry_after_s))} s", retry_after_s, close)


class Draining(ServiceError):
    """503 with Retry-After: loading, shutting down, or work cut off at the drain deadline."""

    status, title = 503, "unavailable"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}


class DeadlineExceeded(ServiceError):
    status, title = 504, "deadline exceeded"


def _problem(status: int, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}


def problem_document(body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    """An RFC 9457 problem as a response (orjson: a refusal under a retry storm must cost next to nothing)."""
    return Response(orjson.dumps(body), status_code=body["status"], headers=headers, media_type=PROBLEM_TYPE)


def _validation_body(errors: list[Any], prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    first = errors[0] if errors else {}
    where = ".".join(str(x) for x in (*prefix, *first.get("loc", ()))) or "request"
    return _problem(422, "invalid request", f"{where}: {first.get('msg', 'invalid')}",
                    field=where, expected=first.get("msg", ""), received=repr(first.get("input"))[:200])


def validation_problem(errors: list[Any], prefix: tuple[str, ...] = ()) -> Response:
    """422 naming the first invalid field, what it expects and what arrived."""
    return problem_document(_validation_body(errors, prefix))


def problem_parts(exc: BaseException) -> tuple[dict[str, Any], dict[str, str] | None]:
    """The problem document and headers for any exception a request raised: the one mapping of errors to
    statuses, whichever protocol renders it (``/v1`` as RFC 9457, ``/v2`` as ``{"error": ...}``)."""
    if isinstance(exc, InputError):
        return exc.problem(), exc.headers
    if isinstance(exc, ServiceError):
        return _problem(exc.status, exc.title, str(exc)), exc.headers()
    if isinstance(exc, ValidationError):
        return _validation_body(exc.errors(), ("query",)), None
    if isinstance(exc, HTTPException):  # Starlette's own (e.g. a malformed multipart body: 400)
        return (_problem(exc.status_code, "bad request" if exc.status_code == 400 else "error", str(exc.detail)),
                dict(exc.headers) if exc.headers else None)
    request_id = uuid.uuid4().hex[:16]
    log.error("request %s failed", request_id, exc_info=(type(exc), exc, exc.__traceback__))
    return _problem(500, "internal error", f"the server failed on this request (request id {request_id})",
                    request_id=request_id), None


def problem_for(exc: BaseException) -> Response:
    """The RFC 9457 problem response for any exception a request raised."""
    return problem_document(*problem_parts(exc))
