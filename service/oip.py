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
errors carry the same statuses, as the protocol's ``{"error": "..."}``.
"""
from __future__ import annotations

import asyncio
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import Depends, FastAPI
from starlette.requests import Request
from starlette.responses import Response

import photoz
from photoz.formats.cutouts import Cutouts, DecodeBudget, Geometry, finish
from photoz.formats.errors import InputError
from photoz.formats.results import ResultRows, Results
from photoz.model.pdf import ESTIMATES
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

JSON = "application/json"
BINARY = "application/octet-stream"
#: The binary tensor data extension's header: the length of the JSON part of a body.
HEADER_LENGTH = "Inference-Header-Content-Length"
#: Extensions of the protocol this server implements (``GET /v2``).
EXTENSIONS = ("binary_tensor_data", "model_configuration")
#: The protocol's numeric tensor types, as little-endian numpy dtypes.
NUMERIC = {"UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "i1", "INT16": "<i2",
           "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
IMAGES, EBV = "images", "ebv"
#: Outputs besides ``probabilities`` and the point estimates.
VALID, FLAGS, PROBLEM, PROBABILITIES = "valid", "flags", "problem", "probabilities"



# -- the protocol's documents ---------------------------------------------------------------------------

def output_types(engine: ServingEngine) -> dict[str, tuple[str, list[int]]]:
    """Each output's datatype and shape (-1: the batch)."""
    n_bins = engine.bundle.metadata.bins.n_bins
    return {PROBABILITIES: ("FP32", [-1, n_bins]), **{key: ("FP32", [-1, 1]) for key in ESTIMATES},
            VALID: ("BOOL", [-1, 1]), FLAGS: ("BYTES", [-1, 1]), PROBLEM: ("BYTES", [-1, 1])}


def input_types(geometry: Geometry) -> dict[str, tuple[str, list[int]]]:
    return {IMAGES: ("FP32", [-1, len(geometry.bands), geometry.size, geometry.size]), EBV: ("FP32", [-1, 1])}


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

@dataclass
class InferRequest:
    """A decoded inference request: its cutouts, the outputs wanted (name -> binary?), id and deadline."""

    cutouts: Cutouts
    outputs: dict[str, bool]
    id: str | None = None
    timeout_s: float | None = None
    prior: dict[str, Any] | None = None  # parameters prior, prior_edges, prior_weights as sent


def _prior_parameters(doc: dict[str, Any]) -> dict[str, Any]:
    """The request's ``parameters.prior`` (a name), ``prior_edges`` and ``prior_weights`` (number lists)."""
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict):
        return {}
    name = parameters.get("prior")
    if name is not None and not isinstance(name, str):
        raise _bad("parameters.prior", "a prior's name (train, flat, self, custom)", name)
    return {"name": name, "edges": parameters.get("prior_edges"), "weights": parameters.get("prior_weights")}


def _bad(field: str, expected: str, received: Any, status: int = 400) -> InputError:
    got = received if isinstance(received, str) else repr(received)[:120]
    return InputError(field, expected, got, status=status, title="bad request")


def _header(body: bytes, header_length: str | None, max_json_bytes: int | None) -> tuple[dict[str, Any], int]:
    """The JSON part of a body as a dict, and where the binary part starts."""
    size = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise _bad(HEADER_LENGTH, f"the length of the JSON part of the body (0 to {len(body)})", header_length)
        size = int(header_length)
    if max_json_bytes is not None and size > max_json_bytes:
        raise _bad("body", f"a JSON part of at most {max_json_bytes} bytes (the server's max_json_mb; send image "
                   "tensors as binary data: tritonclient's default)", f"{size} bytes", status=413)
    try:
        doc = orjson.loads(body[:size])
    except orjson.JSONDecodeError as exc:
        raise _bad("body", f"an inference request in JSON (with {HEADER_LENGTH} when binary tensors follow)",
                   f"unparseable JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise _bad("body", "a JSON object", type(doc).__name__)
    return doc, size


def _shape(spec: dict[str, Any], where: str) -> tuple[int, ...]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise _bad(f"{where}.shape", "a list of non-negative integers", shape)
    return tuple(shape)


def _tensor(spec: Any, where: str, binary: memoryview, offset: int, budget: DecodeBudget) -> tuple[np.ndarray, int]:
    """One input tensor (a view of the body for binary data) and the binary offset after it."""
    if not isinstance(spec, dict):
        raise _bad(where, "a tensor object (name, datatype, shape, data or binary_data_size)", spec)
    datatype, shape = spec.get("datatype"), _shape(spec, where)
    if datatype not in NUMERIC:
        raise _bad(f"{where}.datatype", f"a numeric type ({', '.join(NUMERIC)})", datatype)
    dtype = np.dtype(NUMERIC[datatype])
    count = math.prod(shape)  # Python integers: a hostile shape cannot overflow into a small count
    budget.take(count, dtype.itemsize, where, f"a {datatype} tensor of shape {list(shape)}")
    parameters = spec.get("parameters") or {}
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is not None:
        if size != count * dtype.itemsize:
            raise _bad(f"{where}.parameters.binary_data_size", f"{count * dtype.itemsize} bytes ({datatype} of shape "
                       f"{list(shape)})", f"{size}")
        if offset + size > len(binary):
            raise _bad(f"{where}.parameters.binary_data_size", f"at most the {len(binary) - offset} bytes left in the "
                       "binary part of the body", f"{size}")
        return np.frombuffer(binary, dtype, count, offset).reshape(shape), offset + size
    data = spec.get("data")
    if not isinstance(data, list):
        raise _bad(f"{where}.data", "a list of numbers (row-major), or binary data with binary_data_size",
                   type(data).__name__)
    try:
        array = np.asarray(data, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _bad(f"{where}.data", f"{datatype} numbers", str(exc)[:120]) from None
    if array.size != count:
        raise _bad(f"{where}.data", f"{count} values (shape {list(shape)})", f"{array.size} values")
    return array.reshape(shape), offset


def _wanted_outputs(doc: dict[str, Any], known: tuple[str, ...]) -> dict[str, bool]:
    """The outputs asked for (all when none is named), each with whether it goes back as binary data."""
    parameters = doc.get("parameters") or {}
    default_binary = bool(parameters.get("binary_data_output", False)) if isinstance(parameters, dict) else False
    specs = doc.get("outputs")
    if specs is None:
        return dict.fromkeys(known, default_binary)
    if not isinstance(specs, list):
        raise _bad("outputs", "a list of requested outputs", type(specs).__name__)
    wanted: dict[str, bool] = {}
    for i, spec in enumerate(specs):
        name = spec.get("name") if isinstance(spec, dict) else None
        if name not in known:
            raise _bad(f"outputs[{i}].name", f"one of {', '.join(known)}", name)
        params = spec.get("parameters") or {}
        if not isinstance(params, dict):
            raise _bad(f"outputs[{i}].parameters", "an object", params)
        if params.get("classification"):
            raise _bad(f"outputs[{i}].parameters.classification", "no classification (not supported: ask for "
                       "probabilities)", params["classification"])
        wanted[name] = bool(params.get("binary_data", default_binary))
    return wanted


def _timeout_s(doc: dict[str, Any]) -> float | None:
    parameters = doc.get("parameters") or {}
    timeout = parameters.get("timeout") if isinstance(parameters, dict) else None
    if timeout is None:
        return None
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0:
        raise _bad("parameters.timeout", "a positive integer (microseconds)", timeout)
    return timeout / 1e6


def parse_infer(body: bytes, header_length: str | None, geometry: Geometry, budget: DecodeBudget,
                outputs: tuple[str, ...]) -> InferRequest:
    """An inference request body (JSON, or JSON then binary tensors) as validated cutouts."""
    doc, start = _header(body, header_length, budget.limits.max_json_bytes)
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _bad("inputs", f"a list of input tensors ({IMAGES}, optionally {EBV})", inputs)
    binary, offset, tensors = memoryview(body)[start:], 0, {}
    for i, spec in enumerate(inputs):
        name = spec.get("name") if isinstance(spec, dict) else None
        if name not in (IMAGES, EBV) or name in tensors:
            raise _bad(f"inputs[{i}].name", f"{IMAGES} or {EBV}, each once", name)
        tensors[name], offset = _tensor(spec, f"inputs[{i}]", binary, offset, budget)
    if offset != len(binary):
        raise _bad("body", f"{offset} bytes of binary tensor data after the JSON part (the sum of the inputs' "
                   "binary_data_size)", f"{len(binary)} bytes")
    if IMAGES not in tensors:
        raise _bad("inputs", f"an input named {IMAGES}", [s.get("name") for s in inputs])
    ebv = tensors.get(EBV)
    if ebv is not None:
        if not (ebv.ndim == 1 or (ebv.ndim == 2 and ebv.shape[1] == 1)):
            raise _bad(f"inputs.{EBV}.shape", "[N, 1] or [N] (one E(B-V) in mag per cutout)", str(list(ebv.shape)),
                       status=422)
        ebv = ebv.reshape(-1)
    cutouts = finish(tensors[IMAGES], geometry, ebv, None, f"inputs.{IMAGES}")
    request_id = doc.get("id")
    return InferRequest(cutouts, _wanted_outputs(doc, outputs),
                        request_id if isinstance(request_id, str) else None, _timeout_s(doc), _prior_parameters(doc))


def inflate(body: bytes, encoding: str | None, limit: int) -> bytes:
    """A ``Content-Encoding: gzip`` or ``deflate`` body (``tritonclient``'s request compression), inflated to
    at most ``limit`` bytes (the body limit applies to what it holds, not what it was squeezed to)."""
    if encoding is None or encoding.strip().lower() in ("", "identity"):
        return body
    if encoding.strip().lower() not in ("gzip", "deflate"):
        raise InputError("Content-Encoding", "gzip, deflate or identity", encoding, status=415,
                         title="unsupported media type")
    inflater = zlib.decompressobj(wbits=47)  # zlib or gzip, told apart by their headers
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise _bad("body", f"{encoding}-compressed data", f"undecodable ({exc})") from None
    if len(out) > limit:
        raise InputError("body", f"at most {limit} bytes once inflated", f"more than {limit} bytes", status=413,
                         title="request body too large")
    if not inflater.eof:
        raise _bad("body", f"complete {encoding}-compressed data", "a truncated stream")
    return out


# -- responses --------------------------------------------------------------------------------------------

def _bytes_tensor(values: list[str]) -> bytes:
    """BYTES elements as the binary extension lays them out: a 4-byte little-endian length, then the bytes."""
    return b"".join(struct.pack("<I", len(b)) + b for b in (v.encode("utf-8") for v in values))


def _column(rows: ResultRows, name: str) -> np.ndarray | list[str]:
    """One output's values, a row per input cutout."""
    n = len(rows)
    if name == PROBABILITIES:
        return rows.probs
    if name == VALID:
        return rows.valid.reshape(n, 1)
    if name in (FLAGS, PROBLEM):
        return rows.flags if name == FLAGS else rows.errors
    return rows.estimates[name].astype(np.float32).reshape(n, 1)


def encode_infer(results: Results, request: InferRequest, name: str, version: str) -> tuple[bytes, int | None]:
    """The response body, and the length of its JSON part when binary outputs follow it."""
    rows = results.rows()
    n = len(rows)
    outputs, blobs = [], []
    for output, binary in request.outputs.items():
        values = _column(rows, output)
        datatype = "BYTES" if isinstance(values, list) else "BOOL" if values.dtype == bool else "FP32"
        shape = [n, 1] if isinstance(values, list) else list(values.shape)
        entry: dict[str, Any] = {"name": output, "datatype": datatype, "shape": shape}
        if binary:
            blob = _bytes_tensor(values) if isinstance(values, list) else np.ascontiguousarray(values).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = values if isinstance(values, list) else np.ascontiguousarray(values).ravel()
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": name, "model_version": version, "outputs": outputs,
                           "parameters": {"prior": results.prior["name"]}}
    if request.id is not None:
        doc["id"] = request.id
    head = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    return (head + b"".join(blobs), len(head)) if blobs else (head, None)


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
        raise _bad("path", " or ".join(V2.predict_paths), request.url.path, status=404)
    engine = _model(request, match["name"], match.groupdict().get("version"))
    s, inflight = engine.settings, state_of(request).inflight
    body = await read_body(request, s.max_body_bytes, s.body_timeout_s, inflight)
    body = inflate(body, request.headers.get("content-encoding"), s.max_body_bytes)
    args = (body, request.headers.get(HEADER_LENGTH), engine.geometry, DecodeBudget(s.decode_limits),
            tuple(output_types(engine)))
    parsed = parse_infer(*args) if len(body) <= INLINE_BYTES else await asyncio.to_thread(parse_infer, *args)
    asked = parsed.prior or {}
    prior = resolve_prior(engine, asked.get("name"), asked.get("edges"), asked.get("weights"))
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
