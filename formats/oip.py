"""The Open Inference Protocol's wire format (KServe v2 REST, as Triton, KServe and MLServer speak it): an
inference request's JSON and binary tensors to cutouts (:func:`parse_infer`), results to the response
(:func:`encode_infer`); the routes and documents are :mod:`photoz.service.oip`'s.
"""
from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from photoz.formats.cutouts import Cutouts, DecodeBudget, Geometry, finish
from photoz.formats.errors import InputError
from photoz.formats.results import ResultRows, Results
from photoz.model.priors import LIST_FIELDS

JSON = "application/json"
BINARY = "application/octet-stream"
#: The binary tensor data extension's header: the length of the JSON part of a body.
HEADER_LENGTH = "Inference-Header-Content-Length"
#: The protocol's numeric tensor types, as little-endian numpy dtypes.
NUMERIC = {"UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "i1", "INT16": "<i2",
           "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
IMAGES, EBV = "images", "ebv"
#: Outputs besides ``probabilities`` and the point estimates.
VALID, FLAGS, PROBLEM, PROBABILITIES = "valid", "flags", "problem", "probabilities"
def input_types(geometry: Geometry) -> dict[str, tuple[str, list[int]]]:
    return {IMAGES: ("FP32", [-1, len(geometry.bands), geometry.size, geometry.size]), EBV: ("FP32", [-1, 1])}


@dataclass
class InferRequest:
    """A decoded inference request: its cutouts, the outputs wanted (name -> binary?), id and deadline."""

    cutouts: Cutouts
    outputs: dict[str, bool]
    id: str | None = None
    timeout_s: float | None = None
    prior: dict[str, Any] | None = None  # parameters prior (as "name") and priors.LIST_FIELDS, as sent


def _prior_parameters(doc: dict[str, Any]) -> dict[str, Any]:
    """The request's ``parameters.prior`` (a name, as ``name``) and its number lists, ``priors.LIST_FIELDS``."""
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict):
        return {}
    name = parameters.get("prior")
    if name is not None and not isinstance(name, str):
        raise bad("parameters.prior", "a prior's name (train, flat, self, custom)", name)
    return {"name": name, **{field: parameters.get(field) for field in LIST_FIELDS}}


def bad(field: str, expected: str, received: Any, status: int = 400) -> InputError:
    """A bad request in the protocol's terms: ``field`` (a JSON path), what was expected, what arrived."""
    got = received if isinstance(received, str) else repr(received)[:120]
    return InputError(field, expected, got, status=status, title="bad request")


def _header(body: bytes, header_length: str | None, max_json_bytes: int | None) -> tuple[dict[str, Any], int]:
    """The JSON part of a body as a dict, and where the binary part starts."""
    size = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise bad(HEADER_LENGTH, f"the length of the JSON part of the body (0 to {len(body)})", header_length)
        size = int(header_length)
    if max_json_bytes is not None and size > max_json_bytes:
        raise bad("body", f"a JSON part of at most {max_json_bytes} bytes (the server's max_json_mb; send image "
                   "tensors as binary data: tritonclient's default)", f"{size} bytes", status=413)
    try:
        doc = orjson.loads(body[:size])
    except orjson.JSONDecodeError as exc:
        raise bad("body", f"an inference request in JSON (with {HEADER_LENGTH} when binary tensors follow)",
                   f"unparseable JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise bad("body", "a JSON object", type(doc).__name__)
    return doc, size


#: The largest product of a tensor shape's non-zero axes (the decoded-size budget refuses far less with data).
MAX_TENSOR_AXES_PRODUCT = 2**40


def _shape(spec: dict[str, Any], where: str) -> tuple[int, ...]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise bad(f"{where}.shape", "a list of non-negative integers", shape)
    # an empty tensor's other axes still count: numpy cannot shape (0, 10**6, 10**6, 10**6) either
    if math.prod(d for d in shape if d) > MAX_TENSOR_AXES_PRODUCT:
        raise bad(f"{where}.shape", f"axes whose non-zero lengths multiply to at most {MAX_TENSOR_AXES_PRODUCT:.0e}",
                  shape)
    return tuple(shape)


def _tensor(spec: Any, where: str, binary: memoryview, offset: int, budget: DecodeBudget) -> tuple[np.ndarray, int]:
    """One input tensor (a view of the body for binary data) and the binary offset after it."""
    if not isinstance(spec, dict):
        raise bad(where, "a tensor object (name, datatype, shape, data or binary_data_size)", spec)
    datatype, shape = spec.get("datatype"), _shape(spec, where)
    if datatype not in NUMERIC:
        raise bad(f"{where}.datatype", f"a numeric type ({', '.join(NUMERIC)})", datatype)
    dtype = np.dtype(NUMERIC[datatype])
    count = math.prod(shape)  # Python integers: a hostile shape cannot overflow into a small count
    budget.take(count, dtype.itemsize, where, f"a {datatype} tensor of shape {list(shape)}")
    parameters = spec.get("parameters") or {}
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is not None:
        if size != count * dtype.itemsize:
            raise bad(f"{where}.parameters.binary_data_size", f"{count * dtype.itemsize} bytes ({datatype} of shape "
                       f"{list(shape)})", f"{size}")
        if offset + size > len(binary):
            raise bad(f"{where}.parameters.binary_data_size", f"at most the {len(binary) - offset} bytes left in the "
                       "binary part of the body", f"{size}")
        return np.frombuffer(binary, dtype, count, offset).reshape(shape), offset + size
    data = spec.get("data")
    if not isinstance(data, list):
        raise bad(f"{where}.data", "a list of numbers (row-major), or binary data with binary_data_size",
                   type(data).__name__)
    try:
        array = np.asarray(data, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise bad(f"{where}.data", f"{datatype} numbers", str(exc)[:120]) from None
    if array.size != count:
        raise bad(f"{where}.data", f"{count} values (shape {list(shape)})", f"{array.size} values")
    return array.reshape(shape), offset


def _wanted_outputs(doc: dict[str, Any], known: tuple[str, ...]) -> dict[str, bool]:
    """The outputs asked for (all when none is named), each with whether it goes back as binary data."""
    parameters = doc.get("parameters") or {}
    default_binary = bool(parameters.get("binary_data_output", False)) if isinstance(parameters, dict) else False
    specs = doc.get("outputs")
    if specs is None:
        return dict.fromkeys(known, default_binary)
    if not isinstance(specs, list):
        raise bad("outputs", "a list of requested outputs", type(specs).__name__)
    wanted: dict[str, bool] = {}
    for i, spec in enumerate(specs):
        name = spec.get("name") if isinstance(spec, dict) else None
        if name not in known:
            raise bad(f"outputs[{i}].name", f"one of {', '.join(known)}", name)
        params = spec.get("parameters") or {}
        if not isinstance(params, dict):
            raise bad(f"outputs[{i}].parameters", "an object", params)
        if params.get("classification"):
            raise bad(f"outputs[{i}].parameters.classification", "no classification (not supported: ask for "
                       "probabilities)", params["classification"])
        wanted[name] = bool(params.get("binary_data", default_binary))
    return wanted


def _timeout_s(doc: dict[str, Any]) -> float | None:
    parameters = doc.get("parameters") or {}
    timeout = parameters.get("timeout") if isinstance(parameters, dict) else None
    if timeout is None:
        return None
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0:
        raise bad("parameters.timeout", "a positive integer (microseconds)", timeout)
    return timeout / 1e6


def parse_infer(body: bytes, header_length: str | None, geometry: Geometry, budget: DecodeBudget,
                outputs: tuple[str, ...]) -> InferRequest:
    """An inference request body (JSON, or JSON then binary tensors) as validated cutouts."""
    doc, start = _header(body, header_length, budget.limits.max_json_bytes)
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise bad("inputs", f"a list of input tensors ({IMAGES}, optionally {EBV})", inputs)
    binary, offset, tensors = memoryview(body)[start:], 0, {}
    for i, spec in enumerate(inputs):
        name = spec.get("name") if isinstance(spec, dict) else None
        if name not in (IMAGES, EBV) or name in tensors:
            raise bad(f"inputs[{i}].name", f"{IMAGES} or {EBV}, each once", name)
        tensors[name], offset = _tensor(spec, f"inputs[{i}]", binary, offset, budget)
    if offset != len(binary):
        raise bad("body", f"{offset} bytes of binary tensor data after the JSON part (the sum of the inputs' "
                   "binary_data_size)", f"{len(binary)} bytes")
    if IMAGES not in tensors:
        raise bad("inputs", f"an input named {IMAGES}", [s.get("name") for s in inputs])
    ebv = tensors.get(EBV)
    if ebv is not None:
        if not (ebv.ndim == 1 or (ebv.ndim == 2 and ebv.shape[1] == 1)):
            raise bad(f"inputs.{EBV}.shape", "[N, 1] or [N] (one E(B-V) in mag per cutout)", str(list(ebv.shape)),
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
        raise bad("body", f"{encoding}-compressed data", f"undecodable ({exc})") from None
    if len(out) > limit:
        raise InputError("body", f"at most {limit} bytes once inflated", f"more than {limit} bytes", status=413,
                         title="request body too large")
    if not inflater.eof:
        raise bad("body", f"complete {encoding}-compressed data", "a truncated stream")
    return out


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
