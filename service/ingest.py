"""From an HTTP request to validated cutouts, and from cutouts to the batcher's outputs.

Limits come before work. A request the queue cannot take is refused from its
headers, before its body is read (:func:`admit`). A body is read against
three limits: its size (413), a deadline on progress (no data for
``body_timeout_s``: 408) and the bytes of all bodies being read at once
(429). It is then decoded by :mod:`photoz.formats` within the request's
decoded-size budget: a small plain ``.npy`` on the event loop (a thread hop
costs more than reading it), anything else in a worker thread, so a heavy
body never stalls the loop. A client that disconnects while its work is
queued has that work dropped.
"""
from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Mapping
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.types import Message

from photoz.formats.cutouts import Cutouts, DecodeBudget, Geometry, concatenate, id_list
from photoz.formats.errors import InputError
from photoz.formats.inputs import MEDIA_TYPES, decode, kind_for_filename, parse_list_field, sniff
from photoz.service.batcher import Batcher, Reservation
from photoz.service.errors import Overloaded
from photoz.service.settings import Settings

#: Plain .npy bodies up to this size are decoded on the event loop (64 KiB ~ 2-3 cutouts).
INLINE_BYTES = 256 * 1024
SUPPORTED_BODIES = ("application/fits, application/x-npy, application/x-npz, application/octet-stream, "
                    "application/json or multipart/form-data")
#: A hint a client may send: how many cutouts its body holds (checked against the queue before the body is read).
OBJECTS_HEADER = "x-photoz-objects"
CLOSE = {"Connection": "close"}
#: Where a body the HTTP protocol read whole already travels (the ASGI scope; :mod:`photoz.service.server`):
#: :func:`read_body` takes it from there, within the same limits.
BODY = "photoz.body"
#: Set in the scope when the HTTP protocol cancels the request's task itself when the client goes away:
#: :func:`submit_unless_disconnected` then needs no task watching for the disconnect.
DISCONNECT_CANCELS = "photoz.disconnect_cancels"


class InflightBodies:
    """Bytes of request bodies being read at once, bounded: a request past the bound is refused (429)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit, self.used = limit_bytes, 0

    @contextlib.contextmanager
    def hold(self) -> Any:
        grant = _Grant(self)
        try:
            yield grant
        finally:
            self.used -= grant.held

    def take(self, nbytes: int) -> bool:
        """Count ``nbytes`` as being read if the bound allows (then :meth:`give_back` them); False if not."""
        if self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        return True

    def give_back(self, nbytes: int) -> None:
        self.used -= nbytes

    def refuse(self, wanted: int) -> Overloaded:
        return Overloaded(f"the server is reading {self.used / 2**20:.0f} MiB of request bodies (at most "
                          f"{self.limit / 2**20:.0f} MiB at once); this one needs {wanted / 2**20:.1f} MiB more; "
                          "retry in 1 s", 1.0, close=True)


class _Grant:
    def __init__(self, pool: InflightBodies) -> None:
        self.pool, self.held = pool, 0

    def grow_to(self, nbytes: int) -> None:
        extra = nbytes - self.held
        if extra <= 0:
            return
        if not self.pool.take(extra):
            raise self.pool.refuse(extra)
        self.held = nbytes


def _declared_length(headers: Mapping[str, str]) -> int | None:
    declared = headers.get("content-length", "")
    return int(declared) if declared.isdigit() else None


def admit(headers: Mapping[str, str], batcher: Batcher, geometry: Geometry) -> Reservation:
    """Let a request in from its headers alone (nothing read yet), counting its cutouts as incoming; or 429.

    The count is the client's ``X-Photoz-Objects`` hint, else what the declared
    length holds at float32 (a float16 or compressed body holds more: the
    exact check follows the decoding; a request that could never fit is a 413
    decided then).
    """
    hint = headers.get(OBJECTS_HEADER, "")
    cutout_bytes = len(geometry.bands) * geometry.size ** 2 * 4
    expected = int(hint) if hint.isdigit() else max(1, (_declared_length(headers) or 0) // cutout_bytes)
    expected = min(expected, batcher.max_queue_objects)
    refusal = batcher.admission(expected, before_body=True)
    if refusal is not None:
        raise refusal
    return batcher.reserve(expected)


def _too_large(limit: int, received: str) -> InputError:
    return InputError("body", f"at most {limit} bytes ({limit / 2**20:.0f} MiB)", received, status=413,
                      title="request body too large", headers=CLOSE)


async def _chunks(request: Request, timeout_s: float) -> AsyncIterator[bytes]:
    """The body's chunks, each within ``timeout_s`` of the one before (Python 3.10: no asyncio.timeout)."""
    stream = request.stream().__aiter__()
    while True:
        try:
            yield await asyncio.wait_for(stream.__anext__(), timeout_s)
        except StopAsyncIteration:
            return


def stalled(timeout_s: float, received: int) -> InputError:
    return InputError("body", f"a body that keeps arriving (at most {timeout_s:g} s without data)",
                      f"nothing for {timeout_s:g} s after {received} bytes", status=408, title="request timeout",
                      headers=CLOSE)


async def read_body(request: Request, limit: int, timeout_s: float, inflight: InflightBodies) -> bytes:
    """The request body within its size limit, progress deadline (408 when nothing arrives for ``timeout_s``)
    and the in-flight bound (a body the protocol read already: :data:`BODY`)."""
    whole = request.scope.get(BODY)
    if whole is not None:  # read within the same limits: at most the declared length, counted in flight meanwhile
        if len(whole) > limit:
            raise _too_large(limit, f"{len(whole)} bytes")
        return bytes(whole)
    declared = _declared_length(request.headers)
    if declared is not None and declared > limit:
        raise _too_large(limit, f"{declared} bytes")
    with inflight.hold() as grant:
        grant.grow_to(declared or 0)
        chunks: list[bytes] = []
        size = 0

        def take(chunk: bytes) -> None:
            nonlocal size
            size += len(chunk)
            if size > limit:
                raise _too_large(limit, f"more than {limit} bytes")
            grant.grow_to(size)
            chunks.append(chunk)

        try:
            if sys.version_info >= (3, 11):  # one deadline pushed back per chunk: no task per chunk (wait_for's)
                async with asyncio.timeout(timeout_s) as deadline:
                    async for chunk in request.stream():
                        take(chunk)
                        deadline.reschedule(asyncio.get_running_loop().time() + timeout_s)
            else:
                async for chunk in _chunks(request, timeout_s):
                    take(chunk)
        except asyncio.TimeoutError:  # the builtin TimeoutError on 3.11+
            raise stalled(timeout_s, size) from None
        return b"".join(chunks)


async def read_cutouts(request: Request, geometry: Geometry, settings: Settings, inflight: InflightBodies,
                       ebv: Any, ids: Any) -> Cutouts:
    """The request's cutouts (any supported body), with E(B-V) and ids from the query when given."""
    content_type = request.headers.get("content-type", "")
    base = content_type.split(";")[0].strip().lower()
    if base != "multipart/form-data" and base not in MEDIA_TYPES:
        raise InputError("Content-Type", SUPPORTED_BODIES, content_type or "(none)", status=415,
                         title="unsupported media type")
    body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s, inflight)
    budget = DecodeBudget(settings.decode_limits)
    if base == "multipart/form-data":
        cutouts, ebv, ids = await _read_multipart(request, body, geometry, ebv, ids, budget)
    else:
        kind = MEDIA_TYPES[base]
        if len(body) <= INLINE_BYTES and (kind == "npy" or (kind == "sniff" and sniff(body) == "npy")):
            cutouts = decode(body, kind, geometry, budget=budget)
        else:
            cutouts = await asyncio.to_thread(decode, body, kind, geometry, None, None, "body", budget)
    if ebv is not None:
        cutouts.set_ebv(ebv)
    if ids is not None:
        cutouts.ids = id_list(ids, len(cutouts))
    return cutouts


async def _read_multipart(request: Request, body: bytes, geometry: Geometry, ebv: Any, ids: Any,
                          budget: DecodeBudget) -> tuple[Cutouts, Any, Any]:
    async def replay() -> Message:  # the form parser reads the body already read (and measured) by read_body
        return {"type": "http.request", "body": body, "more_body": False}

    max_parts = budget.limits.max_parts
    form = await Request(request.scope, replay).form(max_files=max_parts, max_fields=max_parts + 16)
    files = [(k, v) for k, v in form.multi_items() if hasattr(v, "read")]
    if not files:
        raise InputError("files", "one or more file parts in the multipart body", "no file parts")
    parts = []
    for _, upload in files:
        data = await upload.read()
        name = upload.filename  # type: ignore[union-attr]
        kind = kind_for_filename(name, upload.content_type)  # type: ignore[union-attr]
        # one budget for all the parts: a request's decoded size is the sum of its files'
        part = await asyncio.to_thread(decode, data, kind, geometry, None, None, f"file {name!r}", budget)
        if len(files) > 1:  # ids stay unique across files
            part.ids = [f"{name}:{i}" for i in part.ids]
        parts.append(part)
    form_ebv, form_ids = form.get("ebv"), form.get("ids")
    ebv = ebv if ebv is not None else parse_list_field(form_ebv if isinstance(form_ebv, str) else None, "ebv")
    ids = ids if ids is not None else parse_list_field(form_ids if isinstance(form_ids, str) else None, "ids")
    return concatenate(parts), ebv, ids


async def submit_unless_disconnected(request: Request, batcher: Batcher, images: np.ndarray, ebv: np.ndarray,
                                     timeout: float, request_id: str = "") -> dict[str, np.ndarray] | None:
    """Run the batcher; if the client disconnects first, cancel (its work is dropped) and return None (where the
    protocol cancels the task itself, :data:`DISCONNECT_CANCELS`, the cancellation propagates instead)."""
    if request.scope.get(DISCONNECT_CANCELS):
        return await batcher.submit(images, ebv, timeout, request_id)
    work = asyncio.current_task()
    assert work is not None
    gone = asyncio.get_running_loop().create_task(_cancel_on_disconnect(request, work))
    try:
        return await batcher.submit(images, ebv, timeout, request_id)
    except asyncio.CancelledError:
        if gone.done() and not gone.cancelled():  # it finished: the client went away and it cancelled us
            getattr(work, "uncancel", lambda: None)()  # Python >= 3.11 counts cancellations
            return None  # the client went away: its queued pieces were dropped by submit
        raise
    finally:
        gone.cancel()


async def _cancel_on_disconnect(request: Request, task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` when the client disconnects (the only way this returns)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            task.cancel()
            return
