"""The photoz REST API (FastAPI). Serves one model bundle with ONNX Runtime; never imports torch.

Endpoints: ``POST /v1/predict``, ``GET /v1/models``, ``/healthz``, ``/readyz``,
``/metrics``. See README.md for the request and response formats. The
handlers are module-level functions that read the per-app :class:`ServiceState`
(``request.app.state.photoz``); the engine (sessions, warm-up, batcher) lives
in :mod:`photoz.service.engine`, errors map to responses in
:mod:`photoz.service.errors`, request bodies become cutouts in
:mod:`photoz.service.ingest`.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from photoz.formats.cutouts import Cutouts
from photoz.formats.errors import InputError
from photoz.formats.inputs import parse_list_field
from photoz.formats.results import ACCEPTED, ENCODERS, Results, choose_media_type
from photoz.service.engine import ServingEngine
from photoz.service.errors import Draining, QueueFull, Unauthorized, problem_for, validation_problem
from photoz.service.ingest import OBJECTS_HEADER, InflightBodies, admit, read_cutouts, submit_unless_disconnected
from photoz.service.settings import Settings

log = logging.getLogger("photoz.service")

#: Responses up to this many objects are encoded on the event loop (a thread hop costs more).
INLINE_OBJECTS = 16
#: Refusals held at once at most (each holds a connection; beyond, refusals go out at once), and the longest hold.
MAX_HELD_REFUSALS, MAX_HOLD_S = 4096, 10.0
#: Status recorded for a client that went away before its answer (nginx's convention).
CLIENT_CLOSED = 499


@dataclass
class ServiceState:
    """One app's settings, engine (None until loaded) and lifecycle flags."""

    settings: Settings
    inflight: InflightBodies
    key_digests: tuple[bytes, ...] = ()
    engine: ServingEngine | None = None
    draining: bool = False
    held_refusals: int = 0

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.draining

    async def hold_refusal(self) -> None:
        """Hold a 429 on a timer (no CPU) before sending it: a client that ignores Retry-After then re-sends at
        most once per hold, instead of as fast as the server can refuse.

        The hold is ``refusal_delay_ms``, longer when more refusals are held than ``max_refusals_per_s`` can
        answer in that time (each waits its turn: refusal work stays bounded however many clients storm),
        at most ``MAX_HOLD_S``.
        """
        s = self.settings
        delay = s.refusal_delay_ms / 1000
        if s.max_refusals_per_s > 0:
            delay = min(max(delay, self.held_refusals / s.max_refusals_per_s), MAX_HOLD_S)
        if delay <= 0 or self.held_refusals >= MAX_HELD_REFUSALS:
            return
        self.held_refusals += 1
        try:
            await asyncio.sleep(delay)
        finally:
            self.held_refusals -= 1

    def cut_off_queued(self) -> None:
        """At the drain deadline: queued work that cannot finish gets 503 + Retry-After, not a dropped connection."""
        if self.engine is not None:
            aborted = self.engine.batcher.abort_queued(Draining("the server is shutting down: this work was still "
                                                                "queued at the drain deadline; retry elsewhere"))
            if aborted:
                log.warning("drain deadline: %d queued cutouts answered 503", aborted)

    def running_engine(self) -> ServingEngine:
        """The engine, or 503 while loading or draining."""
        if self.engine is None or self.draining:
            raise Draining("the server is shutting down" if self.draining else "the model is still loading")
        return self.engine


class PredictParams(BaseModel):
    """The query parameters of ``POST /v1/predict``."""

    pdf: Literal["full", "none"] = Field("full", description="'none': point estimates only")
    all_or_nothing: bool = Field(False, description="fail the request if any cutout is invalid")
    deadline_ms: float | None = Field(None, gt=0, description="drop the work after this long")
    ebv: str | None = Field(None, description="E(B-V) per cutout (comma list) or one value")
    ids: str | None = Field(None, description="object ids (comma list)")


def _state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.photoz
    return state


def key_digest(key: str | bytes) -> bytes:
    """Keys are kept and compared as SHA-256 digests of their bytes (any length, any bytes, constant time)."""
    return hashlib.sha256(key.encode("utf-8") if isinstance(key, str) else key).digest()


async def require_key(request: Request) -> None:  # async: a sync dependency costs a thread hop
    """401 unless the request carries ``Authorization: Bearer <key>`` with a configured key."""
    digests = _state(request).key_digests
    if not digests:
        return
    raw = request.headers.get("authorization", "").encode("latin-1")  # the bytes as sent (HTTP headers)
    scheme, _, token = raw.partition(b" ")
    candidate = key_digest(token.strip())
    # every key compared, so the time taken does not say which key came close
    matches = [hmac.compare_digest(candidate, digest) for digest in digests]
    if scheme.lower() != b"bearer" or not any(matches):
        raise Unauthorized()


async def healthz() -> dict[str, str]:
    return {"status": "alive"}


async def readyz(request: Request) -> Response:
    state = _state(request)
    if state.ready and state.engine is not None:
        return JSONResponse({"status": "ready", "provider": state.engine.provider})
    reason = "draining" if state.draining else "loading"
    return JSONResponse({"status": reason}, status_code=503, headers={"Retry-After": "5"})


async def metrics(request: Request) -> Response:
    engine = _state(request).engine
    if engine is None:
        return PlainTextResponse("", status_code=503)
    return Response(engine.metrics.render(), media_type="text/plain; version=0.0.4")


async def models(request: Request) -> dict[str, Any]:
    engine = _state(request).running_engine()
    md, bundle = engine.bundle.metadata, engine.bundle
    card = bundle.model_card_path
    return {"models": [{
        "name": md.name, "version": md.version, "sha256": bundle.sha256,
        "provider": engine.provider, "bands": list(md.bands), "cutout_size_pixels": md.cutout_size,
        "bins": {"n_bins": md.bins.n_bins, "z_min": float(md.bins.edges[0]), "z_max": float(md.bins.edges[-1])},
        "max_batch_size": engine.settings.max_batch_size, "metadata": md.document,
        "model_card": card.read_text() if card else None,
    }]}


async def predict(request: Request, params: Annotated[PredictParams, Query()]) -> Response:
    """The declared route (OpenAPI, and any mount the fast path does not match)."""
    return await refuse_early(request.scope) or await handle_predict(request, params)


async def handle_predict(request: Request, params: PredictParams | None) -> Response:
    """The whole of ``POST /v1/predict``: auth and query parsing too when ``params`` is None (fast path)."""
    start = time.perf_counter()
    status = 500
    try:
        if params is None:
            await require_key(request)
            params = PredictParams.model_validate(dict(request.query_params))
        response = await _predict(request, params)
    except asyncio.CancelledError:  # the client went away; its queued work is dropped
        status = CLIENT_CLOSED
        raise
    except ClientDisconnect:  # gone while still sending the body
        response = Response(status_code=CLIENT_CLOSED)
    except Exception as exc:  # every error becomes a problem document; none takes the server down
        response = problem_for(exc)
    status = response.status_code
    engine = _state(request).engine
    if engine is not None:
        engine.metrics.requests.labels(status=str(status)).inc()
        engine.metrics.request_latency.observe(time.perf_counter() - start)
    return response


async def _predict(request: Request, params: PredictParams) -> Response:
    engine = _state(request).running_engine()
    media_type = choose_media_type(request.headers.get("accept"))
    if media_type is None:
        raise InputError("Accept", " or ".join(ACCEPTED), request.headers.get("accept", ""), status=406,
                         title="not acceptable")
    cutouts = await read_cutouts(request, engine.geometry, engine.settings, _state(request).inflight,
                                 parse_list_field(params.ebv, "ebv"), parse_list_field(params.ids, "ids"))
    valid = _check_valid(cutouts, params.all_or_nothing)
    timeout = params.deadline_ms / 1000 if params.deadline_ms else engine.settings.request_timeout_s
    images, ebv = (cutouts.images, cutouts.ebv) if valid.all() else (cutouts.images[valid], cutouts.ebv[valid])
    outputs = await submit_unless_disconnected(request, engine.batcher, images, ebv, timeout)
    if outputs is None:
        return Response(status_code=CLIENT_CLOSED)
    outputs = _refuse_non_finite(cutouts, valid, outputs)
    engine.metrics.objects_rejected.inc(sum(p is not None for p in cutouts.problems))
    probs = outputs.pop("probs")
    results = Results(engine.bundle, cutouts.ids, cutouts.problems, probs, outputs)
    encode = ENCODERS[media_type]
    if len(results.ids) <= INLINE_OBJECTS:  # a thread hop costs more than encoding a few rows
        body = encode(results, params.pdf == "full")
    else:
        body = await asyncio.to_thread(encode, results, params.pdf == "full")
    return Response(body, media_type=media_type)


def _check_valid(cutouts: Cutouts, all_or_nothing: bool) -> np.ndarray:
    """Which cutouts go to the model; 422 if none does (or any does not, with ``all_or_nothing``)."""
    valid = np.array([p is None for p in cutouts.problems])
    if not valid.any() or (all_or_nothing and not valid.all()):
        bad = [(cutouts.ids[i], cutouts.problems[i]) for i in np.flatnonzero(~valid)]
        raise InputError("images", "finite pixel values in every band",
                         "; ".join(f"object {i}: {p}" for i, p in bad[:5]) + (" ..." if len(bad) > 5 else ""))
    return valid


def _refuse_non_finite(cutouts: Cutouts, valid: np.ndarray, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Objects whose PDF came out non-finite (pixel values beyond float32's reach, e.g. a 1e30 mask
    sentinel) become that object's error instead of a PDF of NaNs marked valid."""
    finite = np.isfinite(outputs["probs"]).all(axis=1)
    if finite.all():
        return outputs
    for i in np.flatnonzero(valid)[~finite]:
        cutouts.problems[i] = ("the network's output is not finite for this cutout: pixel values out of range "
                               "(masked-pixel sentinels such as 1e30 must be NaN)")
    return {key: value[finite] for key, value in outputs.items()}


class PredictFastPath:
    """ASGI middleware: ``POST /v1/predict`` goes straight to its handler.

    The route is also declared on the FastAPI app (for the OpenAPI document and
    any mount this path does not match) and both call the same handler; this
    skips FastAPI's per-request routing, dependency solving and exception
    middleware, which cost about as much as the rest of a one-cutout request
    on the event loop (the loop shares the cores with inference on a CPU).
    """

    def __init__(self, app: ASGIApp, handler: Callable[[Request, None], Awaitable[Response]]) -> None:
        self.app, self.handler = app, handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/v1/predict":
            response = await refuse_early(scope) or await self.handler(Request(scope, receive, send), None)
            await response(scope, receive, send)
        else:
            await self.app(scope, receive, send)


async def refuse_early(scope: Scope) -> Response | None:
    """Under overload, the 429 for a request from its headers alone, held on a timer before it goes out: no
    Request object, no auth, no body read (``Connection: close``), so a retry storm costs the server as little
    as it can (docs/security.md). Both routes of ``POST /v1/predict`` start here."""
    state: ServiceState = scope["app"].state.photoz
    engine = state.engine
    if engine is None or state.draining or not engine.batcher.queued:
        return None
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
               if name in ADMISSION_HEADERS}
    try:
        admit(headers, engine.batcher, engine.geometry)
    except QueueFull as exc:
        engine.metrics.refused_early.inc()
        await state.hold_refusal()
        return problem_for(exc)
    return None


#: The headers :func:`refuse_early` reads.
ADMISSION_HEADERS = (b"content-length", OBJECTS_HEADER.encode())


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServiceState = app.state.photoz
    engine = await asyncio.to_thread(ServingEngine, state.settings)
    if state.key_digests:
        log.info("auth enabled (%d key%s)", len(state.key_digests), "" if len(state.key_digests) == 1 else "s")
    else:
        log.warning("auth DISABLED: every client may predict (set PHOTOZ_API_KEYS or --api-keys)")
    await engine.start()
    state.engine = engine
    try:
        yield
    finally:
        state.draining = True
        await engine.stop()


async def _problem_handler(request: Request, exc: Exception) -> Response:
    return problem_for(exc)


async def _validation_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return validation_problem(list(exc.errors()))


def create_app(settings: Settings | None = None) -> FastAPI:
    """The photoz app for ``settings`` (default: from the ``PHOTOZ_*`` environment)."""
    settings = settings or Settings.from_env()
    app = FastAPI(title="photoz", version="1", lifespan=lifespan,
                  description="Photometric redshifts of galaxies from ugriz cutouts.")
    app.state.photoz = ServiceState(settings, InflightBodies(settings.max_inflight_body_bytes),
                                    tuple(key_digest(k) for k in settings.api_keys))
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(Exception, _problem_handler)
    for error in (InputError, Unauthorized, Draining):
        app.add_exception_handler(error, _problem_handler)
    app.add_api_route("/healthz", healthz, methods=["GET"], include_in_schema=False)
    app.add_api_route("/readyz", readyz, methods=["GET"], include_in_schema=False)
    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    app.add_api_route("/v1/models", models, methods=["GET"], dependencies=[Depends(require_key)])
    app.add_api_route("/v1/predict", predict, methods=["POST"], dependencies=[Depends(require_key)],
                      responses={200: {"content": {t: {} for t in ACCEPTED}}})
    app.add_middleware(PredictFastPath, handler=handle_predict)
    return app
