"""The Open Inference Protocol (KServe v2 REST, as Triton, KServe and MLServer speak it) beside ``/v1``.

=======  ==============================================  ==========================================
GET      ``/v2``                                         server metadata (name, version, extensions)
GET      ``/v2/health/live``, ``/v2/health/ready``       liveness, readiness
GET      ``/v2/models/{name}[/versions/{v}]``            model metadata (inputs, outputs, parameters)
GET      ``/v2/models/{name}[/versions/{v}]/ready``      model readiness
GET      ``/v2/models/{name}[/versions/{v}]/config``     Triton's model configuration extension
POST     ``/v2/models/{name}[/versions/{v}]/infer``      inference
=======  ==============================================  ==========================================

Inference takes ``images`` ([N, 5, 64, 64], FP32; any other numeric type,
FP16 to halve the bytes, is converted) and optionally ``ebv`` ([N, 1] or [N],
mag; 0 when absent, as on ``/v1``), as JSON ``data`` or with Triton's binary
tensor data extension (``Inference-Header-Content-Length`` and
``binary_data_size``, what ``tritonclient`` sends by default). Outputs, one
row per input cutout: ``probabilities`` FP32 [N, n_bins], each point estimate
of :data:`~photoz.model.pdf.ESTIMATES` FP32 [N, 1], ``valid`` BOOL [N, 1],
``flags`` and ``problem`` BYTES [N, 1]. A cutout the model could not run
(non-finite pixels, E(B-V) out of range) has ``valid`` false, NaN PDF and
estimates, and its reason in ``problem``. Outputs go back as binary where the
request asks for it (per output ``binary_data``, or ``binary_data_output`` for
all).

The same batcher, limits (body size, decoded size, JSON size, in-flight
bodies), auth, deadlines (Triton's ``timeout`` parameter, microseconds),
early refusal and metrics as ``/v1/predict`` (:mod:`photoz.service.state`);
errors carry the same statuses, as the protocol's ``{"error": "..."}``. The wire format (requests' JSON and
binary tensors to cutouts, results to responses) is :mod:`photoz.formats.oip`.
"""
from __future__ import annotations

import asyncio
from typing import Any

import orjson
from fastapi import Depends, FastAPI
from starlette.requests import Request
from starlette.responses import Response

import photoz
from photoz.formats.cutouts import DecodeBudget
from photoz.formats.errors import InputError
from photoz.formats.oip import (
    BINARY,
    EBV,
    FLAGS,
    HEADER_LENGTH,
    JSON,
    PROBABILITIES,
    PROBLEM,
    VALID,
    bad,
    encode_infer,
    inflate,
    input_types,
    parse_infer,
)
from photoz.model.pdf import ESTIMATES
from photoz.model.priors import LIST_FIELDS
from photoz.service.engine import ServingEngine
from photoz.service.ingest import INLINE_BYTES, read_body
from photoz.service.routes import V2, bind, oip_error
from photoz.service.state import (
    CLIENT_CLOSED,
    answer,
    check_prior_population,
    encoded,
    predict_cutouts,
    refuse_early,
    require_key,
    resolve_prior,
    state_of,
    with_prior,
)

#: Extensions of the protocol this server implements (``GET /v2``).
EXTENSIONS = ("binary_tensor_data", "model_configuration")


# -- the protocol's documents ---------------------------------------------------------------------------

def output_types(engine: ServingEngine) -> dict[str, tuple[str, list[int]]]:
    """Each output's datatype and shape (-1: the batch)."""
    n_bins = engine.bundle.metadata.bins.n_bins
    return {PROBABILITIES: ("FP32", [-1, n_bins]), **{key: ("FP32", [-1, 1]) for key in ESTIMATES},
            VALID: ("BOOL", [-1, 1]), FLAGS: ("BYTES", [-1, 1]), PROBLEM: ("BYTES", [-1, 1])}


def model_metadata(engine: ServingEngine) -> dict[str, Any]:
    md = engine.bundle.metadata
    tensors = [{"name": name, "datatype": dtype, "shape": shape}
               for name, (dtype, shape) in input_types(engine.geometry).items()]
    return {
        "name": md.name, "versions": [md.version], "platform": "onnxruntime_onnx", "inputs": tensors,
        "outputs": [{"name": name, "datatype": dtype, "shape": shape}
                    for name, (dtype, shape) in output_types(engine).items()],
        "parameters": {"bands": ",".join(md.bands), "cutout_size_pixels": md.cutout_size,
                       "z_bin_edges": [float(z) for z in md.bins.edges], "sha256": engine.bundle.sha256,
                       "ebv_unit": "mag", "ebv_optional": True, "provider": engine.provider},
    }


def model_config(engine: ServingEngine) -> dict[str, Any]:
    """Triton's model configuration (``tritonclient``'s ``get_model_config``): dims without the batch axis."""
    def tensors(types: dict[str, tuple[str, list[int]]], optional: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        return [{"name": name, "data_type": f"TYPE_{'STRING' if dtype == 'BYTES' else dtype}", "dims": shape[1:],
                 **({"optional": True} if name in optional else {})} for name, (dtype, shape) in types.items()]

    s = engine.settings
    return {"name": engine.bundle.metadata.name, "platform": "onnxruntime_onnx", "backend": "onnxruntime",
            "max_batch_size": s.max_batch_size, "input": tensors(input_types(engine.geometry), (EBV,)),
            "output": tensors(output_types(engine)),
            "dynamic_batching": {"max_queue_delay_microseconds": int(s.max_queue_delay_ms * 1000)}}


# -- requests ---------------------------------------------------------------------------------------------


# -- responses --------------------------------------------------------------------------------------------


# -- handlers ---------------------------------------------------------------------------------------------

def _model(request: Request, name: str, version: str | None) -> ServingEngine:
    """The engine when ``name`` (and ``version``, if given) is the model served; 404 otherwise."""
    engine = state_of(request).running_engine()
    md = engine.bundle.metadata
    if name != md.name or (version is not None and version != md.version):
        asked = f"{name!r}" + (f" version {version!r}" if version is not None else "")
        raise InputError("model", f"{md.name!r} (version {md.version!r}): the model this server serves", asked,
                         status=404, title="not found")
    return engine


async def server_metadata() -> dict[str, Any]:
    return {"name": "photoz", "version": photoz.__version__, "extensions": list(EXTENSIONS)}


async def live() -> dict[str, bool]:
    return {"live": True}


async def ready(request: Request) -> Response:
    state = state_of(request)
    if state.ready:
        return Response(orjson.dumps({"ready": True}), media_type=JSON)
    return Response(orjson.dumps({"ready": False}), status_code=503, media_type=JSON, headers={"Retry-After": "5"})


async def metadata(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
    return model_metadata(_model(request, name, version))


async def config(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
    return model_config(_model(request, name, version))


async def model_ready(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
    engine = _model(request, name, version)  # 503 while loading or draining
    return {"name": engine.bundle.metadata.name, "ready": True}


async def infer(request: Request) -> Response:
    """``POST /v2/models/{name}[/versions/{v}]/infer``, declared and fast path alike (the path is parsed here)."""
    refusal = await refuse_early(request.scope)
    if refusal is not None:
        return oip_error(refusal)
    return await answer(request, lambda: _infer(request), oip_error)


bind(V2, infer)  # the app answers inference requests with it ahead of FastAPI (photoz.service.app.PhotozApp)


async def _infer(request: Request) -> Response:
    await require_key(request)
    match = V2.match_prediction(request.url.path)
    if match is None:  # a mount or root_path the table's paths do not see
        raise bad("path", " or ".join(V2.predict_paths), request.url.path, status=404)
    engine = _model(request, match["name"], match.groupdict().get("version"))
    s, inflight = engine.settings, state_of(request).inflight
    body = await read_body(request, s.max_body_bytes, s.body_timeout_s, inflight)
    body = inflate(body, request.headers.get("content-encoding"), s.max_body_bytes)
    args = (body, request.headers.get(HEADER_LENGTH), engine.geometry, DecodeBudget(s.decode_limits),
            tuple(output_types(engine)))
    parsed = parse_infer(*args) if len(body) <= INLINE_BYTES else await asyncio.to_thread(parse_infer, *args)
    asked = parsed.prior or {}
    prior = resolve_prior(engine, asked.get("name"), *(asked.get(field) for field in LIST_FIELDS))
    check_prior_population(prior, parsed.cutouts)
    results = await predict_cutouts(request, engine, parsed.cutouts, parsed.timeout_s or s.request_timeout_s,
                                    parsed.id)
    if results is None:
        return Response(status_code=CLIENT_CLOSED)
    results = await with_prior(results, prior, engine.train_prior)
    md = engine.bundle.metadata
    content, json_length = await encoded(results, encode_infer, parsed, md.name, md.version)
    if json_length is None:
        return Response(content, media_type=JSON)
    return Response(content, media_type=BINARY, headers={HEADER_LENGTH: str(json_length)})


def add_routes(app: FastAPI) -> None:
    """Declare the ``/v2`` routes (the OpenAPI document lists them; inference also takes the fast path)."""
    keyed = [Depends(require_key)]
    app.add_api_route("/v2", server_metadata, methods=["GET"], tags=["v2"])
    app.add_api_route("/v2/health/live", live, methods=["GET"], tags=["v2"])
    app.add_api_route("/v2/health/ready", ready, methods=["GET"], tags=["v2"])
    for model in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        app.add_api_route(model, metadata, methods=["GET"], dependencies=keyed, tags=["v2"])
        app.add_api_route(model + "/ready", model_ready, methods=["GET"], dependencies=keyed, tags=["v2"])
        app.add_api_route(model + "/config", config, methods=["GET"], dependencies=keyed, tags=["v2"])
    for path in V2.predict_paths:
        app.add_api_route(path, infer, methods=["POST"], tags=["v2"],
                          responses={200: {"content": {JSON: {}, BINARY: {}}}})
