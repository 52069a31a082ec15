"""The photoz REST API (FastAPI). Serves one model bundle with ONNX Runtime; never imports torch.

Endpoints: ``POST /v1/predict``, ``GET /v1/models``, ``/healthz``, ``/readyz``,
``/metrics``. See README.md for the request and response formats.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field, ValidationError
from starlette.requests import ClientDisconnect

from photoz.model.bundle import Bundle, load_bundle
from photoz.model.runtime import OnnxPredictor
from photoz.service.batcher import Batcher, DeadlineExceeded, Draining, QueueFull
from photoz.formats.inputs import (Cutouts, Geometry, InputError, MEDIA_TYPES, concatenate, decode, ebv_vector, id_list,
                            kind_for_filename, parse_list_field)
from photoz.service.metrics import Metrics
from photoz.formats.results import ACCEPTED, ENCODERS, Results, choose_media_type
from photoz.service.settings import Settings

log = logging.getLogger("photoz.service")


@dataclass
class ServiceState:
    settings: Settings
    bundle: Bundle | None = None
    predictor: OnnxPredictor | None = None
    batcher: Batcher | None = None
    metrics: Metrics | None = None
    ready: bool = False
    draining: bool = False
    started: float = field(default_factory=time.time)

    @property
    def geometry(self) -> Geometry:
        md = self.bundle.metadata
        return Geometry(md.bands, md.cutout_size)


def problem_response(status: int, title: str, detail: str, headers: dict | None = None, **extra) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, headers=headers, media_type="application/problem+json")


class PredictParams(BaseModel):
    """The query parameters of ``POST /v1/predict``."""

    pdf: Literal["full", "none"] = Field("full", description="'none': point estimates only")
    all_or_nothing: bool = Field(False, description="fail the request if any cutout is invalid")
    deadline_ms: float | None = Field(None, gt=0, description="drop the work after this long")
    ebv: str | None = Field(None, description="E(B-V) per cutout (comma list) or one value")
    ids: str | None = Field(None, description="object ids (comma list)")


def validation_problem(errors: list, prefix: tuple = ()) -> JSONResponse:
    """422 naming the first invalid field, what it expects and what arrived."""
    first = errors[0] if errors else {}
    where = ".".join(str(x) for x in (*prefix, *first.get("loc", ()))) or "request"
    return problem_response(422, "invalid request", f"{where}: {first.get('msg', 'invalid')}",
                            field=where, expected=first.get("msg", ""), received=repr(first.get("input"))[:200])


class PredictFastPath:
    """ASGI middleware: ``POST /v1/predict`` goes straight to its handler.

    The route is also declared on the FastAPI app (for the OpenAPI document and
    any mount this path does not match) and both call the same handler; this
    skips FastAPI's per-request routing, dependency solving and exception
    middleware, which cost about as much as the rest of a one-cutout request
    on the event loop (the loop shares the cores with inference on a CPU).
    """

    def __init__(self, app, handler):
        self.app, self.handler = app, handler

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/v1/predict":
            response = await self.handler(Request(scope, receive, send), None)
            await response(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def warm_up(predictor: OnnxPredictor, max_batch_size: int) -> list[int]:
    """Run each batch-size bucket once so the first real requests pay no set-up cost."""
    md = predictor.metadata
    sizes = sorted({min(2**k, max_batch_size) for k in range(max_batch_size.bit_length() + 1)})
    for n in sizes:
        predictor.predict(np.zeros((n, len(md.bands), md.cutout_size, md.cutout_size), np.float32),
                          np.zeros(n, np.float32))
    return sizes


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    state = ServiceState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.bundle = load_bundle(settings.model)
        state.predictor = OnnxPredictor(state.bundle, settings.providers, settings.threads_per_batch,
                                        settings.inter_op_threads, allow_spinning=False)
        md = state.bundle.metadata
        import onnxruntime as ort

        log.info("model %s %s (sha256 %s) loaded from %s", md.name, md.version, state.bundle.sha256[:12],
                 settings.model)
        log.info("execution provider: %s (requested %r; this onnxruntime offers %s)", state.predictor.provider,
                 settings.providers, ", ".join(ort.get_available_providers()))
        if settings.providers != "cpu" and state.predictor.provider == "CPUExecutionProvider":
            log.warning("no GPU execution provider is usable here: falling back to CPUExecutionProvider")
        state.metrics = Metrics(settings.max_batch_size)
        solo = None
        if state.predictor.provider == "CPUExecutionProvider" and \
                settings.threads_when_alone > settings.threads_per_batch:
            # a second session on the same bundle for lone batches (a GPU needs none: one batch fills it)
            solo = OnnxPredictor(state.bundle, "cpu", settings.threads_when_alone, settings.inter_op_threads,
                                 allow_spinning=False)
        if settings.warmup:
            for engine in (state.predictor, solo):
                if engine is not None:
                    sizes = await asyncio.to_thread(warm_up, engine, settings.max_batch_size)
            log.info("warmed up batch sizes %s", sizes)
        state.batcher = Batcher(state.predictor.predict_with_estimates, settings.max_batch_size,
                                settings.max_queue_delay_ms / 1000, settings.max_queue_objects,
                                settings.inference_workers, state.metrics.batch_stats(),
                                infer_alone=solo.predict_with_estimates if solo is not None else None)
        state.batcher.start()
        state.ready = True
        log.info("ready: max_batch_size=%d max_queue_delay_ms=%g inference_workers=%d threads_per_batch=%d "
                 "threads_when_alone=%s", settings.max_batch_size, settings.max_queue_delay_ms,
                 settings.inference_workers, settings.threads_per_batch,
                 settings.threads_when_alone if solo is not None else "-")
        try:
            yield
        finally:
            state.draining, state.ready = True, False
            await state.batcher.drain(settings.drain_timeout_s)
            await state.batcher.close()
            log.info("drained and stopped")

    app = FastAPI(title="photoz", version="1", lifespan=lifespan,
                  description="Photometric redshifts of galaxies from ugriz cutouts.")
    app.state.photoz = state

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return validation_problem(exc.errors())

    async def require_key(request: Request) -> None:  # async: a sync dependency costs a thread hop
        if not settings.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.strip(), k) for k in settings.api_keys):
            raise _Unauthorized()

    @app.exception_handler(_Unauthorized)
    async def _unauthorized(request: Request, exc: _Unauthorized):
        return problem_response(401, "unauthorized", "a valid API key is required: Authorization: Bearer <key>",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.get("/healthz", include_in_schema=False)
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz():
        if state.ready and not state.draining:
            return {"status": "ready", "provider": state.predictor.provider}
        reason = "draining" if state.draining else "loading"
        return JSONResponse({"status": reason}, status_code=503, headers={"Retry-After": "5"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        if state.metrics is None:
            return PlainTextResponse("", status_code=503)
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models():
        md = state.bundle.metadata
        card = state.bundle.model_card_path
        return {"models": [{
            "name": md.name, "version": md.version, "sha256": state.bundle.sha256,
            "provider": state.predictor.provider, "bands": list(md.bands), "cutout_size_pixels": md.cutout_size,
            "bins": {"n_bins": md.bins.n_bins, "z_min": float(md.bins.edges[0]), "z_max": float(md.bins.edges[-1])},
            "max_batch_size": settings.max_batch_size, "metadata": md.document,
            "model_card": card.read_text() if card else None,
        }]}

    @app.post("/v1/predict", dependencies=[Depends(require_key)],
              responses={200: {"content": {t: {} for t in ACCEPTED}}})
    async def predict(request: Request, params: Annotated[PredictParams, Query()]):
        return await handle_predict(request, params)

    async def handle_predict(request: Request, params: PredictParams | None) -> Response:
        """The whole of ``POST /v1/predict``: auth and query parsing when ``params`` is None (fast path)."""
        start = time.perf_counter()
        status = 500
        try:
            if params is None:
                if settings.api_keys:
                    try:
                        await require_key(request)
                    except _Unauthorized as exc:
                        status = 401
                        return await _unauthorized(request, exc)
                try:
                    params = PredictParams.model_validate(dict(request.query_params))
                except ValidationError as exc:
                    status = 422
                    return validation_problem(exc.errors(), ("query",))
            response = await _predict(request, params.pdf, params.all_or_nothing, params.deadline_ms, params.ebv,
                                      params.ids)
            status = response.status_code
            return response
        except InputError as exc:
            status = exc.status
            return JSONResponse(exc.problem(), status_code=exc.status, media_type="application/problem+json")
        except QueueFull as exc:
            status = 429
            return problem_response(429, "overloaded", str(exc), {"Retry-After": f"{exc.retry_after_s:.0f}"})
        except Draining as exc:
            status = 503
            return problem_response(503, "unavailable", str(exc), {"Retry-After": "5"})
        except DeadlineExceeded as exc:
            status = 504
            return problem_response(504, "deadline exceeded", str(exc))
        except asyncio.CancelledError:  # the client went away; its queued work is dropped
            status = 499
            raise
        except ClientDisconnect:  # gone while still sending the body
            status = 499
            return Response(status_code=499)
        except Exception as exc:  # never let one request take the server down
            log.exception("prediction failed")
            return problem_response(500, "internal error", f"{type(exc).__name__}: {exc}")
        finally:
            if state.metrics is not None:
                state.metrics.requests.labels(status=str(status)).inc()
                state.metrics.request_latency.observe(time.perf_counter() - start)

    async def _predict(request, pdf, all_or_nothing, deadline_ms, ebv, ids) -> Response:
        if state.draining or not state.ready:
            raise Draining("the server is shutting down" if state.draining else "the model is still loading")
        media_type = choose_media_type(request.headers.get("accept"))
        if media_type is None:
            raise InputError("Accept", " or ".join(ACCEPTED), request.headers.get("accept", ""), status=406,
                             title="not acceptable")
        cutouts = await read_cutouts(request, state, parse_list_field(ebv, "ebv"), parse_list_field(ids, "ids"))
        valid = np.array([p is None for p in cutouts.problems])
        if not valid.any() or (all_or_nothing and not valid.all()):
            bad = [(cutouts.ids[i], cutouts.problems[i]) for i in np.flatnonzero(~valid)]
            raise InputError("images", "finite pixel values in every band",
                             "; ".join(f"object {i}: {p}" for i, p in bad[:5]) + (" ..." if len(bad) > 5 else ""))
        timeout = deadline_ms / 1000 if deadline_ms else settings.request_timeout_s
        images, ebv_ = (cutouts.images, cutouts.ebv) if valid.all() else (cutouts.images[valid], cutouts.ebv[valid])
        outputs = await _submit_unless_disconnected(request, state.batcher, images, ebv_, timeout)
        if outputs is None:
            return Response(status_code=499)
        state.metrics.objects_rejected.inc(int((~valid).sum()))
        probs = outputs.pop("probs")
        results = Results(state.bundle, cutouts.ids, cutouts.problems, probs, outputs)
        encode = ENCODERS[media_type]
        if len(results.ids) <= INLINE_OBJECTS:  # a thread hop costs more than encoding a few rows
            body = encode(results, pdf == "full")
        else:
            body = await asyncio.to_thread(encode, results, pdf == "full")
        return Response(body, media_type=media_type)

    app.add_middleware(PredictFastPath, handler=handle_predict)
    return app


#: Requests up to this size are decoded, and responses up to this many objects encoded, on the event
#: loop: for a few cutouts the hop to a worker thread costs more than the work (64 KiB ~ 2-3 cutouts).
INLINE_BYTES = 256 * 1024
INLINE_OBJECTS = 16


class _Unauthorized(Exception):
    pass


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise InputError("body", f"at most {limit} bytes ({limit / 2**20:.0f} MiB)", f"{int(declared)} bytes",
                         status=413, title="request body too large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InputError("body", f"at most {limit} bytes ({limit / 2**20:.0f} MiB)", f"more than {limit} bytes",
                             status=413, title="request body too large")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_cutouts(request: Request, state: ServiceState, ebv, ids) -> Cutouts:
    content_type = request.headers.get("content-type", "")
    base = content_type.split(";")[0].strip().lower()
    body = await read_body(request, state.settings.max_body_bytes)
    geometry = state.geometry
    if base == "multipart/form-data":
        request._body = body  # Starlette's form parser then reads the buffered body
        form = await request.form(max_files=10_000, max_fields=1_000)
        files = [(k, v) for k, v in form.multi_items() if hasattr(v, "read")]
        if not files:
            raise InputError("files", "one or more file parts in the multipart body", "no file parts")
        parts = []
        for _, upload in files:
            data = await upload.read()
            kind = kind_for_filename(upload.filename, upload.content_type)
            part = await asyncio.to_thread(decode, data, kind, geometry, None, None, f"file {upload.filename!r}")
            if len(files) > 1:  # ids stay unique across files
                part.ids = [f"{upload.filename}:{i}" for i in part.ids]
            parts.append(part)
        cutouts = concatenate(parts)
        ebv = ebv if ebv is not None else parse_list_field(form.get("ebv"), "ebv")
        ids = ids if ids is not None else parse_list_field(form.get("ids"), "ids")
    else:
        if base not in MEDIA_TYPES:
            raise InputError("Content-Type", "application/fits, application/x-npy, application/x-npz, "
                             "application/octet-stream, application/json or multipart/form-data",
                             content_type or "(none)", status=415, title="unsupported media type")
        if len(body) <= INLINE_BYTES:  # small bodies decode faster than a hop to a thread
            cutouts = decode(body, MEDIA_TYPES[base], geometry)
        else:
            cutouts = await asyncio.to_thread(decode, body, MEDIA_TYPES[base], geometry)
    if ebv is not None:
        cutouts.ebv = ebv_vector(ebv, len(cutouts))
    if ids is not None:
        cutouts.ids = id_list(ids, len(cutouts))
    return cutouts


async def _submit_unless_disconnected(request: Request, batcher: Batcher, images, ebv, timeout):
    """Run the batcher; if the client disconnects first, cancel (its work is dropped) and return None."""
    work = asyncio.current_task()
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


async def _cancel_on_disconnect(request: Request, task: asyncio.Task) -> None:
    """Cancel ``task`` when the client disconnects (the only way this returns)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            task.cancel()
            return
