"""From an HTTP request to validated cutouts, and from cutouts to the batcher's outputs.

The body is read with a size limit, decoded by :mod:`photoz.formats.inputs`
(on the event loop when small, where a thread hop would cost more than the
work; in a thread otherwise), and handed to the batcher; a client that
disconnects while its work is queued has that work dropped.
"""
from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from starlette.requests import Request

from photoz.formats.errors import InputError
from photoz.formats.inputs import (
    MEDIA_TYPES,
    Cutouts,
    Geometry,
    concatenate,
    decode,
    ebv_vector,
    id_list,
    kind_for_filename,
    parse_list_field,
)
from photoz.service.batcher import Batcher

#: Requests up to this size are decoded on the event loop: for a few cutouts the hop to a worker
#: thread costs more than the work (64 KiB ~ 2-3 cutouts).
INLINE_BYTES = 256 * 1024
SUPPORTED_BODIES = ("application/fits, application/x-npy, application/x-npz, application/octet-stream, "
                    "application/json or multipart/form-data")


def _too_large(limit: int, received: str) -> InputError:
    return InputError("body", f"at most {limit} bytes ({limit / 2**20:.0f} MiB)", received, status=413,
                      title="request body too large")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit, f"{int(declared)} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit, f"more than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_cutouts(request: Request, geometry: Geometry, max_body_bytes: int, ebv: Any, ids: Any) -> Cutouts:
    """The request's cutouts (any supported body), with E(B-V) and ids from the query when given."""
    content_type = request.headers.get("content-type", "")
    base = content_type.split(";")[0].strip().lower()
    body = await read_body(request, max_body_bytes)
    if base == "multipart/form-data":
        cutouts, ebv, ids = await _read_multipart(request, body, geometry, ebv, ids)
    elif base not in MEDIA_TYPES:
        raise InputError("Content-Type", SUPPORTED_BODIES, content_type or "(none)", status=415,
                         title="unsupported media type")
    elif len(body) <= INLINE_BYTES:  # small bodies decode faster than a hop to a thread
        cutouts = decode(body, MEDIA_TYPES[base], geometry)
    else:
        cutouts = await asyncio.to_thread(decode, body, MEDIA_TYPES[base], geometry)
    if ebv is not None:
        cutouts.ebv = ebv_vector(ebv, len(cutouts))
    if ids is not None:
        cutouts.ids = id_list(ids, len(cutouts))
    return cutouts


async def _read_multipart(request: Request, body: bytes, geometry: Geometry, ebv: Any,
                          ids: Any) -> tuple[Cutouts, Any, Any]:
    request._body = body  # Starlette's form parser then reads the buffered body
    form = await request.form(max_files=10_000, max_fields=1_000)
    files = [(k, v) for k, v in form.multi_items() if hasattr(v, "read")]
    if not files:
        raise InputError("files", "one or more file parts in the multipart body", "no file parts")
    parts = []
    for _, upload in files:
        data = await upload.read()
        name = upload.filename  # type: ignore[union-attr]
        kind = kind_for_filename(name, upload.content_type)  # type: ignore[union-attr]
        part = await asyncio.to_thread(decode, data, kind, geometry, None, None, f"file {name!r}")
        if len(files) > 1:  # ids stay unique across files
            part.ids = [f"{name}:{i}" for i in part.ids]
        parts.append(part)
    form_ebv, form_ids = form.get("ebv"), form.get("ids")
    ebv = ebv if ebv is not None else parse_list_field(form_ebv if isinstance(form_ebv, str) else None, "ebv")
    ids = ids if ids is not None else parse_list_field(form_ids if isinstance(form_ids, str) else None, "ids")
    return concatenate(parts), ebv, ids


async def submit_unless_disconnected(request: Request, batcher: Batcher, images: np.ndarray, ebv: np.ndarray,
                                     timeout: float) -> dict[str, np.ndarray] | None:
    """Run the batcher; if the client disconnects first, cancel (its work is dropped) and return None."""
    work = asyncio.current_task()
    assert work is not None
    gone = asyncio.get_running_loop().create_task(_cancel_on_disconnect(request, work))
    try:
        return await batcher.submit(images, ebv, timeout)
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
