"""Property-based fuzzing of POST /v1/predict, in-process: malformed npy, npz, FITS, JSON, multipart bodies,
headers and query values. Every answer is a 200 or a 4xx problem document (never a 5xx), and no request
makes the process allocate more than 300 MB (tracemalloc's peak, which numpy reports to).

    pytest tests/unit/test_fuzz.py --hypothesis-show-statistics      # more examples: HYPOTHESIS_PROFILE=long
"""
import io
import os
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from photoz.service.app import create_app
from photoz.service.settings import Settings
from tests.helpers import npy_bytes

settings.register_profile("default", max_examples=50, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("long", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
MEMORY_BOUND = 300 * 2**20


@pytest.fixture(scope="module")
def client(tiny_bundle):
    app = create_app(Settings(model=tiny_bundle, providers="cpu", warmup=False, max_body_mb=8, max_decoded_mb=32,
                              max_json_mb=1, max_hdus=16, max_parts=8))
    tracemalloc.start()
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client
    tracemalloc.stop()


def send(client, body: bytes, headers: dict, params: dict | None = None):
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    response = client.post("/v1/predict", content=body, headers=headers, params=params or {})
    grown = tracemalloc.get_traced_memory()[1] - before
    assert response.status_code == 200 or 400 <= response.status_code < 500, (response.status_code, response.text)
    if response.status_code >= 400:
        problem = response.json()
        assert problem["status"] == response.status_code and problem["detail"]
    assert grown < MEMORY_BOUND, f"{grown / 2**20:.0f} MiB for one request"
    return response


# -- strategies ---------------------------------------------------------------

dtypes = st.sampled_from(["<f4", ">f8", "<f2", "|u1", "<i2", ">i8", "|b1", "<c8", "|S8", "<U4", "|O", "<V16", "x"])
shapes = st.lists(st.integers(0, 2**40) | st.integers(0, 70), max_size=5).map(tuple)


@st.composite
def npy_bodies(draw) -> bytes:
    descr, fortran, shape = draw(dtypes), draw(st.booleans()), draw(shapes)
    header = f"{{'descr': {descr!r}, 'fortran_order': {fortran}, 'shape': {shape!r}, }}"
    header = draw(st.sampled_from([header, header[: len(header) // 2], header.replace("'", '"')]))
    encoded = header.encode("latin-1") + b" " * draw(st.integers(0, 40)) + b"\n"
    version = draw(st.sampled_from([b"\x01\x00", b"\x02\x00", b"\x03\x00", b"\x09\x09"]))
    size = struct.pack("<H", len(encoded)) if version == b"\x01\x00" else struct.pack("<I", len(encoded))
    data = draw(st.binary(max_size=2048)) if draw(st.booleans()) else bytes(draw(st.integers(0, 5 * 64 * 64 * 8)))
    return b"\x93NUMPY" + version + size + encoded + data


def valid_npy(images: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, images)
    return buffer.getvalue()


@st.composite
def npz_bodies(draw) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for _ in range(draw(st.integers(1, 4))):
            name = draw(st.sampled_from(["images.npy", "data.npy", "ebv.npy", "ids.npy", "other.npy", "images"]))
            payload = draw(npy_bodies()) if draw(st.booleans()) else valid_npy(
                np.zeros(draw(st.sampled_from([(5, 64, 64), (2, 5, 64, 64), (3,), (2,)])), np.float32))
            method = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2,
                                           zipfile.ZIP_LZMA]))
            zf.writestr(zipfile.ZipInfo(name), payload, compress_type=method)
    body = buffer.getvalue()
    cut = draw(st.integers(0, len(body)))
    return body if draw(st.booleans()) else body[:cut] + draw(st.binary(max_size=64))


def card(key: str, value: str) -> bytes:
    return f"{key:<8}= {value:>20}".ljust(80)[:80].encode("latin-1")


fits_values = st.one_of(st.integers(-2**62, 2**62).map(str), st.sampled_from(["T", "F", "'abc'", "(1.0, 2.0)",
                                                                              "1.5E300", "'r'", "''"]))


@st.composite
def fits_bodies(draw) -> bytes:
    cards = [card("SIMPLE", "T"), card("BITPIX", draw(st.sampled_from(["8", "16", "32", "-32", "-64", "7", "'x'"])))]
    naxis = draw(st.integers(0, 4))
    cards.append(card("NAXIS", str(naxis)))
    cards += [card(f"NAXIS{i + 1}", str(draw(st.sampled_from([0, 1, 5, 64, 70000, 2**31])))) for i in range(naxis)]
    for key in draw(st.lists(st.sampled_from(["EBV", "FILTER", "BSCALE", "BZERO", "EXTEND", "PCOUNT"]), max_size=3)):
        cards.append(card(key, draw(fits_values)))
    cards.append(b"END".ljust(80))
    header = b"".join(cards)
    header += b" " * (-len(header) % 2880)
    data = bytes(draw(st.integers(0, 5 * 64 * 64 * 4))) if draw(st.booleans()) else draw(st.binary(max_size=4096))
    extension = b""
    if draw(st.booleans()):  # a second HDU, often a broken table
        ext = [card("XTENSION", draw(st.sampled_from(["'BINTABLE'", "'IMAGE   '", "'TABLE   '", "'JUNK'"]))),
               card("BITPIX", "8"), card("NAXIS", "2"), card("NAXIS1", str(draw(st.integers(0, 100)))),
               card("NAXIS2", str(draw(st.integers(0, 10**7)))), card("PCOUNT", "0"), card("GCOUNT", "1"),
               card("TFIELDS", "1"), card("TTYPE1", draw(st.sampled_from(["'EBV'", "'ID'", "'X'"]))),
               card("TFORM1", draw(st.sampled_from(["'D'", "'5A'", "'Q7'", "'1PE(2)'", "'K'"]))), b"END".ljust(80)]
        extension = b"".join(ext)
        extension += b" " * (-len(extension) % 2880) + draw(st.binary(max_size=2880))
    return header + data + extension


json_values = st.recursive(st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=6), inner,
                                                                                      max_size=4), max_leaves=60)


@st.composite
def json_bodies(draw) -> bytes:
    import json

    doc = draw(st.fixed_dictionaries({}, optional={"images": json_values, "ebv": json_values, "ids": json_values})
               | json_values)
    text = json.dumps(doc)
    return draw(st.sampled_from([text, text[: len(text) // 2], "[" * 3000 + "]" * 3000])).encode()


@st.composite
def multipart_bodies(draw) -> tuple[bytes, str]:
    boundary = draw(st.sampled_from(["zzz", "", "a b", "x" * 100]))
    parts = []
    for _ in range(draw(st.integers(0, 10))):
        disposition = draw(st.sampled_from(['form-data; name="files"; filename="a.npy"', 'form-data; name="ebv"',
                                            'form-data; name="files"; filename="b.fits"', "garbage"]))
        content = draw(npy_bodies()) if draw(st.booleans()) else draw(st.binary(max_size=256))
        parts.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n")
    body = b"".join(parts) + (f"--{boundary}--\r\n".encode() if draw(st.booleans()) else b"")
    content_type = draw(st.sampled_from([f"multipart/form-data; boundary={boundary}", "multipart/form-data"]))
    return body, content_type


# -- properties -----------------------------------------------------------------


@given(body=npy_bodies(), content_type=st.sampled_from(["application/x-npy", "application/octet-stream"]))
def test_malformed_npy(client, body, content_type):
    send(client, body, {"Content-Type": content_type})


@given(body=npz_bodies())
def test_malformed_npz(client, body):
    send(client, body, {"Content-Type": "application/x-npz"})


@given(body=fits_bodies())
def test_malformed_fits(client, body):
    send(client, body, {"Content-Type": "application/fits"})


@given(body=json_bodies())
def test_malformed_json(client, body):
    send(client, body, {"Content-Type": "application/json"})


@given(body_and_type=multipart_bodies())
def test_malformed_multipart(client, body_and_type):
    body, content_type = body_and_type
    send(client, body, {"Content-Type": content_type})


header_text = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=40)


@given(content_type=header_text, accept=header_text, authorization=st.binary(max_size=40),
       params=st.dictionaries(st.sampled_from(["ebv", "ids", "pdf", "deadline_ms", "all_or_nothing", "x"]),
                              header_text | st.just("[" * 2000), max_size=4))
def test_malformed_headers_and_query(client, content_type, accept, authorization, params):
    body = valid_npy(np.zeros((2, 5, 64, 64), np.float32))
    headers = {"Content-Type": content_type.encode("latin-1"), "Accept": accept.encode("latin-1"),
               "Authorization": authorization.replace(b"\r", b"").replace(b"\n", b"")}
    send(client, body, headers, params)


# -- the Open Inference Protocol's infer route -------------------------------------------------------------

tensor_specs = st.fixed_dictionaries(
    {"name": st.sampled_from(["images", "ebv", "pixels"]),
     "datatype": st.sampled_from(["FP32", "FP16", "FP64", "INT8", "BOOL", "BYTES", "fp32", 7]),
     "shape": st.lists(st.integers(-1, 70) | st.integers(0, 2**40), max_size=5) | st.none()},
    optional={"data": st.lists(st.floats(allow_nan=True) | st.integers(-2**70, 2**70) | st.text(max_size=3),
                               max_size=30) | st.text(max_size=5),
              "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-5, 2**40)
                                                                 | st.sampled_from([None, "10", 1.5])})})


@given(specs=st.lists(tensor_specs, max_size=3), tail=st.binary(max_size=300),
       header_length=st.none() | st.integers(-3, 400).map(str) | st.sampled_from(["", "1e3", " 5"]),
       outputs=st.none() | st.lists(st.fixed_dictionaries({"name": st.sampled_from(["probabilities", "z_mean", "zz"])},
                                                          optional={"parameters": st.dictionaries(
                                                              st.sampled_from(["binary_data", "classification"]),
                                                              st.booleans() | st.integers(0, 3))}), max_size=3),
       parameters=st.dictionaries(st.sampled_from(["timeout", "binary_data_output", "x"]),
                                  st.integers(-2, 10**7) | st.booleans() | st.text(max_size=3)))
def test_fuzzed_oip_infer_requests_get_200_or_a_4xx_error_never_a_5xx(client, specs, tail, header_length, outputs,
                                                                        parameters):
    import json

    doc = {"inputs": specs, "parameters": parameters, **({"outputs": outputs} if outputs is not None else {})}
    head = json.dumps(doc).encode()
    headers = {"Inference-Header-Content-Length": header_length} if header_length is not None else {}
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    response = client.post("/v2/models/photoz-test-tiny/infer", content=head + tail, headers=headers)
    grown = tracemalloc.get_traced_memory()[1] - before
    assert response.status_code == 200 or 400 <= response.status_code < 500, (response.status_code, response.text)
    if response.status_code >= 400:
        assert response.json()["error"]
    assert grown < MEMORY_BOUND, f"{grown / 2**20:.0f} MiB for one request"


# -- extreme values through the shipped bundle ------------------------------------

extreme_floats = st.floats(width=32) | st.sampled_from([1e30, -1e30, 3.4e38, -3.4e38, 1e10, -1e10, 1e-40, 0.0])


@pytest.fixture(scope="module")
def shipped_client():
    from photoz.model.bundle import default_bundle_path

    app = create_app(Settings(model=default_bundle_path(), providers="cpu", warmup=False))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@st.composite
def mixed_stacks(draw) -> np.ndarray:
    """1-6 sky cutouts, each with a few pixels (or a whole band) set to drawn float32 values, extremes included."""
    n = draw(st.integers(1, 6))
    images = np.random.default_rng(draw(st.integers(0, 2**16))).normal(0, 0.05, (n, 5, 64, 64)).astype(np.float32)
    for i in range(n):
        for _ in range(draw(st.integers(0, 3))):
            band, y, x = draw(st.integers(0, 4)), draw(st.integers(0, 63)), draw(st.integers(0, 63))
            if draw(st.booleans()):
                images[i, band, y, x] = draw(extreme_floats)
            else:
                images[i, band] = draw(extreme_floats)
    return images


@given(images=mixed_stacks())
def test_extreme_pixel_values_in_mixed_stacks_never_fail_the_shipped_model(shipped_client, images):
    """Every usable cutout gets a finite PDF, every unusable one (non-finite, or beyond the physical bound) is
    rejected naming its band, and no answer is a 5xx."""
    from photoz.model.conventions import MAX_ABS_PIXEL_NMGY

    unusable = ~(np.abs(images) <= MAX_ABS_PIXEL_NMGY).all(axis=(1, 2, 3))
    response = shipped_client.post("/v1/predict", content=npy_bytes(images),
                                   headers={"Content-Type": "application/x-npy"})
    if unusable.all():
        assert response.status_code == 422 and "object 0" in response.json()["received"]
        return
    assert response.status_code == 200, response.text
    doc = response.json()
    assert [r["index"] for r in doc["rejected"]] == np.flatnonzero(unusable).tolist()
    assert all("in band" in r["error"] for r in doc["rejected"])
    assert np.isfinite(np.array(doc["data"]["pdfs"])).all() and len(doc["data"]["pdfs"]) == (~unusable).sum()


@pytest.fixture(scope="module")
def shipped_predictor():
    from photoz.model.bundle import default_bundle_path, load_bundle
    from photoz.model.runtime import OnnxPredictor

    return OnnxPredictor(load_bundle(default_bundle_path()), providers="cpu")


@given(images=mixed_stacks())
def test_the_shipped_graph_itself_never_raises_on_any_float32_input(shipped_predictor, images):
    """Below the service's validation: ONNX Runtime runs the shipped graph on anything, extremes and NaN
    included; a cutout it cannot use comes out non-finite (the caller's object error), never an exception."""
    from photoz.model.conventions import MAX_ABS_PIXEL_NMGY

    probs = shipped_predictor.predict(images, np.zeros(len(images), np.float32))
    usable = (np.abs(images) <= MAX_ABS_PIXEL_NMGY).all(axis=(1, 2, 3))
    assert np.isfinite(probs[usable]).all()
