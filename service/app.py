"""The photoz REST API (FastAPI). Serves one model bundle with ONNX Runtime; never imports torch.

Endpoints: ``POST /v1/predict``, ``GET /v1/models``, ``/healthz``, ``/readyz``,
``/metrics``, and the Open Inference Protocol (KServe v2 / Triton) under ``/v2``
(:mod:`photoz.service.oip`). See docs/api.md for the request and response
formats. The handlers are module-level functions that read the per-app
:class:`~photoz.service.state.ServiceState` (``request.app.state.photoz``); what
both protocols share (auth, early refusal, running cutouts) is in
:mod:`photoz.service.state`, the engine (sessions, warm-up, batcher) in
:mod:`photoz.service.engine`, errors map to responses in
:mod:`photoz.service.errors`, request bodies become cutouts in
:mod:`photoz.service.ingest`.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from photoz.formats.cutouts import Cutouts
from photoz.formats.errors import InputError
from photoz.formats.inputs import parse_list_field
from photoz.formats.results import ACCEPTED, ENCODERS, choose_media_type
from photoz.model import priors
from photoz.model.conventions import EBV_RANGE_MAG, MAX_ABS_PIXEL_NMGY
from photoz.model.quality import quality_summary
from photoz.service import oip
from photoz.service.engine import ServingEngine
from photoz.service.errors import Draining, Unauthorized, problem_for, validation_problem
from photoz.service.ingest import InflightBodies, read_cutouts
from photoz.service.routes import V1, bind, prediction_handler, render_error
from photoz.service.settings import Settings
from photoz.service.state import (
    CLIENT_CLOSED,
    ServiceState,
    answer,
    check_prior_population,
    encoded,
    key_digest,
    predict_cutouts,
    refuse_early,
    require_key,
    resolve_prior,
    state_of,
    with_prior,
)

log = logging.getLogger("photoz.service")



class PredictParams(BaseModel):
    """The query parameters of ``POST /v1/predict``."""

    pdf: Literal["full", "none"] = Field("full", description="'none': point estimates only")
    all_or_nothing: bool = Field(False, description="fail the request if any cutout is invalid")
    deadline_ms: float | None = Field(None, gt=0, description="drop the work after this long")
    ebv: str | None = Field(None, description="E(B-V) per cutout (comma list) or one value")
    ids: str | None = Field(None, description="object ids (comma list)")
    prior: str | None = Field(None, description="redshift prior of the PDFs: train (default: as trained), flat, "
                                                "self (the request's own n(z); >= 200 objects) or custom")
    prior_edges: str | None = Field(None, description="custom prior: histogram bin edges in z (comma list)")
    prior_weights: str | None = Field(None, description="custom prior: one weight per histogram bin (comma list)")
    selection_edges: str | None = Field(None, description="the sample's selection (with prior=self or custom): "
                                                          "completeness histogram bin edges in z (comma list)")
    selection_completeness: str | None = Field(None, description="the sample's selection: the fraction of its "
                                                                 "parent population kept, per bin (comma list)")


_NO_PARAMS = PredictParams.model_validate({})  # an empty query's (read only)


async def healthz() -> dict[str, str]:
    return {"status": "alive"}


async def readyz(request: Request) -> Response:
    state = state_of(request)
    if state.ready and state.engine is not None:
        return JSONResponse({"status": "ready", "provider": state.engine.provider})
    reason = "draining" if state.draining else "loading"
    return JSONResponse({"status": reason}, status_code=503, headers={"Retry-After": "5"})


async def metrics(request: Request) -> Response:
    engine = state_of(request).engine
    if engine is None:
        return PlainTextResponse("", status_code=503)
    return Response(engine.metrics.render(), media_type="text/plain; version=0.0.4")


async def models(request: Request) -> dict[str, Any]:
    engine = state_of(request).running_engine()
    md, bundle = engine.bundle.metadata, engine.bundle
    card = bundle.model_card_path
    metadata = md.document if not md.quality else {**md.document, "quality": quality_summary(md.quality)}
    return {"models": [{
        "name": md.name, "version": md.version, "sha256": bundle.sha256,
        "provider": engine.provider, "bands": list(md.bands), "cutout_size_pixels": md.cutout_size,
        "bins": {"n_bins": md.bins.n_bins, "z_min": float(md.bins.edges[0]), "z_max": float(md.bins.edges[-1])},
        "max_batch_size": engine.settings.max_batch_size, "metadata": metadata,
        "model_card": card.read_text() if card else None,
    }]}


async def predict(request: Request, params: Annotated[PredictParams, Query()]) -> Response:
    """``POST /v1/predict``: the declared route (OpenAPI) with ``params``, the fast path with None."""
    refusal = await refuse_early(request.scope)
    return problem_for(refusal) if refusal is not None else await handle_predict(request, params)


async def predict_fast(request: Request) -> Response:
    return await predict(request, None)  # type: ignore[arg-type]


bind(V1, predict_fast)  # the app answers POST /v1/predict with it ahead of FastAPI (PhotozApp)


async def handle_predict(request: Request, params: PredictParams | None) -> Response:
    """The whole of ``POST /v1/predict``: auth and query parsing too when ``params`` is None (fast path)."""
    async def work() -> Response:
        if params is None:
            await require_key(request)
            query = request.scope["query_string"]
            return await _predict(request, PredictParams.model_validate(dict(request.query_params)) if query
                                  else _NO_PARAMS)
        return await _predict(request, params)

    return await answer(request, work, problem_for)


async def _predict(request: Request, params: PredictParams) -> Response:
    engine = state_of(request).running_engine()
    media_type = choose_media_type(request.headers.get("accept"))
    if media_type is None:
        raise InputError("Accept", " or ".join(ACCEPTED), request.headers.get("accept", ""), status=406,
                         title="not acceptable")
    prior = resolve_prior(engine, params.prior, *(parse_list_field(getattr(params, name), name)
                                                  for name in priors.LIST_FIELDS))
    cutouts = await read_cutouts(request, engine.geometry, engine.settings, state_of(request).inflight,
                                 parse_list_field(params.ebv, "ebv"), parse_list_field(params.ids, "ids"))
    _check_valid(cutouts, params.all_or_nothing)
    check_prior_population(prior, cutouts)
    timeout = params.deadline_ms / 1000 if params.deadline_ms else engine.settings.request_timeout_s
    results = await predict_cutouts(request, engine, cutouts, timeout)
    if results is None:
        return Response(status_code=CLIENT_CLOSED)
    results = await with_prior(results, prior, engine.train_prior)
    body = await encoded(results, ENCODERS[media_type], params.pdf == "full")
    return Response(body, media_type=media_type)


def _check_valid(cutouts: Cutouts, all_or_nothing: bool) -> None:
    """422 if no cutout can go to the model (or any cannot, with ``all_or_nothing``)."""
    valid = sum(p is None for p in cutouts.problems)
    if not valid or (all_or_nothing and valid < len(cutouts.problems)):
        bad = [(i, p) for i, p in zip(cutouts.ids, cutouts.problems, strict=True) if p is not None]
        raise InputError("images", "cutouts the network can use (finite pixels within "
                         f"+-{MAX_ABS_PIXEL_NMGY:.0e} nanomaggies in every band, E(B-V) in "
                         f"{EBV_RANGE_MAG[0]:g}-{EBV_RANGE_MAG[1]:g} mag)",
                         "; ".join(f"object {i}: {p}" for i, p in bad[:5]) + (" ..." if len(bad) > 5 else ""))


class PhotozApp(FastAPI):
    """FastAPI, with the prediction routes (``POST /v1/predict``, ``POST /v2/models/{name}/infer``) answered
    before its middleware stack.

    The routes are also declared on the app (for the OpenAPI document, and for
    any path this lookup does not match) and both call the same handler,
    which renders every error itself; this skips FastAPI's telemetry, error
    and body-limit middleware, routing and dependency solving, which cost
    about as much as the rest of a one-cutout request on the event loop (the
    loop shares the cores with inference on a CPU). Being the app itself, it
    holds under any ASGI server.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = prediction_handler(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" \
            else None
        if handler is None:
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self
        response = await handler(Request(scope, receive, send))
        await response(scope, receive, send)


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
    return render_error(request.url.path, exc)


async def _validation_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return validation_problem(list(exc.errors()))


def create_app(settings: Settings | None = None) -> FastAPI:
    """The photoz app for ``settings`` (default: from the ``PHOTOZ_*`` environment)."""
    settings = settings or Settings.from_env()
    app = PhotozApp(title="photoz", version="1", lifespan=lifespan,
                  description="Photometric redshifts of galaxies from ugriz cutouts.")
    app.state.photoz = ServiceState(settings, InflightBodies(settings.max_inflight_body_bytes),
                                    tuple(key_digest(k) for k in settings.api_keys))
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(Exception, _problem_handler)
    for error in (InputError, Unauthorized, Draining, HTTPException):
        app.add_exception_handler(error, _problem_handler)
    app.add_api_route("/healthz", healthz, methods=["GET"], include_in_schema=False)
    app.add_api_route("/readyz", readyz, methods=["GET"], include_in_schema=False)
    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    app.add_api_route("/v1/models", models, methods=["GET"], dependencies=[Depends(require_key)])
    for path in V1.predict_paths:
        app.add_api_route(path, predict, methods=["POST"], dependencies=[Depends(require_key)],
                          responses={200: {"content": {t: {} for t in ACCEPTED}}})
    oip.add_routes(app)
    return app
