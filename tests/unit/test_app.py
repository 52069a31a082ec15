"""The service in-process (ASGI, Starlette's TestClient): routing, auth, error mapping, the npy reader.

A real ONNX Runtime session on the tiny bundle; no network.
"""
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from fastapi.testclient import TestClient

from photoz.service.app import create_app
from photoz.service.settings import Settings
from tests.helpers import npy_bytes, sky_cutouts

NPY = {"Content-Type": "application/x-npy"}


@pytest.fixture(scope="module")
def client(tiny_bundle):
    app = create_app(Settings(model=tiny_bundle, providers="cpu", api_keys=["k", "s\u00e9same"], warmup=False))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


AUTH = {**NPY, "Authorization": "Bearer k"}


@pytest.mark.parametrize("array", [np.arange(5 * 64 * 64, dtype="<f4").reshape(5, 64, 64),
                                   np.arange(2 * 5 * 64 * 64, dtype=">f8").reshape(2, 5, 64, 64),
                                   np.zeros((3, 64, 64, 5), np.int16), np.zeros((0, 5, 64, 64), np.float32),
                                   np.asfortranarray(np.ones((5, 64, 64), np.float32))])
def test_npy_reader_matches_numpy_for_every_layout_numpy_writes(array):
    from photoz.formats.cutouts import Geometry
    from photoz.formats.numpy_input import decode_npy, npy_view

    body = npy_bytes(array)
    fast = npy_view(body)
    if array.flags.f_contiguous and not array.flags.c_contiguous:
        assert fast is None  # Fortran order: left to np.load
    else:
        assert fast.dtype == array.dtype and fast.shape == array.shape and np.array_equal(fast, array)
    assert npy_view(body[:-4]) is None  # truncated: np.load gives the error
    if array.size:
        np.testing.assert_array_equal(decode_npy(body, Geometry(tuple("ugriz"), 64)).images,
                                      np.load(io.BytesIO(body)).astype(np.float32).reshape(-1, 5, 64, 64)
                                      if array.shape[-1] != 5 else np.moveaxis(array, -1, 1).astype(np.float32))


def with_and_without_fast_path(bundle):
    """(True, the app as served) and (False, the same app without the fast path: FastAPI's routing)."""
    for fast in (True, False):
        with pytest.MonkeyPatch.context() as patch:
            if not fast:
                patch.setattr("photoz.service.app.prediction_handler", lambda path: None)
            yield fast, create_app(Settings(model=bundle, providers="cpu", api_keys=["k"], warmup=False))


def test_declared_route_and_fast_path_answer_alike(tiny_bundle, rng):
    """POST /v1/predict normally takes the ASGI fast path; the FastAPI route (OpenAPI, other mounts) is the same
    handler: same answers for a good request, a bad query, a bad body and a missing key."""
    body = npy_bytes(sky_cutouts(rng, 3))
    answers = {}
    for fast, app in with_and_without_fast_path(tiny_bundle):
        with TestClient(app) as client:
            auth = {**NPY, "Authorization": "Bearer k"}
            calls = [client.post("/v1/predict", content=body, headers=auth, params={"ids": "a,b,c"}),
                     client.post("/v1/predict", content=body, headers=auth, params={"deadline_ms": "-1"}),
                     client.post("/v1/predict", content=b"junk", headers=auth),
                     client.post("/v1/predict", content=body, headers=NPY)]
            answers[fast] = [(r.status_code, r.json()) for r in calls]
            params = {p["name"] for p in app.openapi()["paths"]["/v1/predict"]["post"]["parameters"]}
            assert params == {"pdf", "all_or_nothing", "deadline_ms", "ebv", "ids", "prior", "prior_edges",
                              "prior_weights", "selection_edges", "selection_completeness"}
    assert [a[0] for a in answers[True]] == [200, 422, 400, 401]
    assert answers[True][1][1]["field"] == "query.deadline_ms"
    assert answers[True] == answers[False]


def test_non_ascii_and_unknown_keys_are_401_never_500(client, rng):
    body = npy_bytes(sky_cutouts(rng, 1))
    for header in ("Bearer k\u00e9".encode(), b"Bearer wrong", b"Basic k", b"Bearer", b"\xff\xfe"):
        response = client.post("/v1/predict", content=body, headers={**NPY, "Authorization": header})
        assert response.status_code == 401, (header, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        assert client.get("/v1/models", headers={"Authorization": header}).status_code == 401
    # a key with non-ASCII characters works when sent as its UTF-8 bytes
    utf8_key = "Bearer s\u00e9same".encode()
    assert client.post("/v1/predict", content=body, headers={**NPY, "Authorization": utf8_key}).status_code == 200


@pytest.mark.parametrize("content_type, body", [
    ("multipart/form-data", b"--x\r\nnot a part"),  # no boundary
    ("multipart/form-data; boundary=zzz", b"garbage without the boundary"),
    ("multipart/form-data; boundary=zzz", b"--zzz\r\nContent-Disposition: form-data\r\n\r\nx\r\n--zzz--\r\n"),
])
def test_malformed_multipart_is_a_4xx_problem_not_a_500(client, content_type, body):
    response = client.post("/v1/predict", content=body, headers={"Content-Type": content_type,
                                                                 "Authorization": "Bearer k"})
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"] == "application/problem+json"


def test_unexpected_failure_is_a_500_without_internals_carrying_a_request_id(client, rng, monkeypatch, caplog):
    engine = client.app.state.photoz.engine

    async def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail /etc/passwd")

    monkeypatch.setattr(engine.batcher, "submit", broken)
    response = client.post("/v1/predict", content=npy_bytes(sky_cutouts(rng, 1)), headers=AUTH)
    assert response.status_code == 500
    problem = response.json()
    assert "secret" not in response.text and problem["request_id"] in problem["detail"]
    assert any(problem["request_id"] in r.getMessage() for r in caplog.records)  # the log has the rest


@pytest.mark.parametrize("cause", ["sentinel", "network"])
def test_a_cutout_without_a_finite_pdf_is_that_objects_error(client, rng, monkeypatch, cause):
    """A masked-pixel sentinel (1e30 nanomaggies) is refused before the model; a PDF that comes out non-finite
    anyway (here: a network made to answer NaN for the second cutout) becomes that object's error too. Either
    way the others get their PDFs, and nothing is marked valid with a PDF of NaNs."""
    images = sky_cutouts(rng, 3)
    if cause == "sentinel":
        images[1, 2, 10, 10] = 1e30
    else:
        batcher = client.app.state.photoz.engine.batcher
        real = batcher.infer

        def nan_for_the_brightest(images, ebv):
            out = real(images, ebv)
            out["probs"][images.max(axis=(1, 2, 3)) > 100] = np.nan
            return out

        images[1, 2, 10, 10] = 500.0
        monkeypatch.setattr(batcher, "infer", nan_for_the_brightest)
        monkeypatch.setattr(batcher, "infer_alone", None)
    response = client.post("/v1/predict", content=npy_bytes(images), headers=AUTH, params={"ids": "a,b,c"})
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["ancil"]["ids"] == ["a", "c"] and np.isfinite(doc["data"]["pdfs"]).all()
    assert [r["id"] for r in doc["rejected"]] == ["b"]
    assert ("band r (1e+30 nanomaggies)" if cause == "sentinel" else "output is not finite") in \
        doc["rejected"][0]["error"]
    fits_answer = client.post("/v1/predict", content=npy_bytes(images),
                              headers={**AUTH, "Accept": "application/fits"})
    from astropy.io import fits

    with fits.open(io.BytesIO(fits_answer.content)) as hdul:
        assert list(hdul["PHOTOZ"].data["VALID"]) == [True, False, True]


def test_non_ascii_ids_in_every_output_format(client, rng):
    from astropy.io import fits

    ids = "galaxie-\u00e9t\u00e9,\u661f\u7cfb"
    body = npy_bytes(sky_cutouts(rng, 2))
    assert client.post("/v1/predict", content=body, headers=AUTH, params={"ids": ids}).json()["ancil"]["ids"] == \
        ids.split(",")
    answer = client.post("/v1/predict", content=body, headers={**AUTH, "Accept": "application/fits"},
                         params={"ids": ids})
    assert answer.status_code == 200, answer.text
    with fits.open(io.BytesIO(answer.content)) as hdul:  # UTF-8 bytes in the column
        assert [v.decode("utf-8") for v in np.asarray(hdul["PHOTOZ"].data)["ID"]] == ids.split(",")
    answer = client.post("/v1/predict", content=body, headers={**AUTH, "Accept": "application/x-hdf5"},
                         params={"ids": ids})
    assert answer.status_code == 200, answer.text
    import h5py

    with h5py.File(io.BytesIO(answer.content)) as h5:
        assert [v.decode("utf-8") for v in h5["ancil/ids"][...]] == ids.split(",")


def test_blank_api_keys_flag_refuses_to_start(tiny_bundle):
    result = subprocess.run([sys.executable, "-m", "photoz", "serve", "--model", str(tiny_bundle), "--api-keys", " , "],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "holds no key" in result.stderr


def test_a_bad_ebv_carried_by_a_file_rejects_that_object_only(client, rng):
    from tests.helpers import npz_bytes

    body = npz_bytes(images=sky_cutouts(rng, 3), ebv=np.array([0.02, np.nan, 11.0], np.float32))
    doc = client.post("/v1/predict", content=body, headers={**AUTH, "Content-Type": "application/x-npz"}).json()
    assert doc["ancil"]["ids"] == ["0"] and [r["index"] for r in doc["rejected"]] == [1, 2]
    assert all("not a finite value in 0-10 mag" in r["error"] for r in doc["rejected"])


def _oip_body(images):
    head = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": list(images.shape),
                                   "parameters": {"binary_data_size": images.nbytes}}],
                       "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
    return head + images.astype("<f4").tobytes(), {"Inference-Header-Content-Length": str(len(head))}


def test_oip_infer_fast_path_and_declared_route_answer_alike(tiny_bundle, rng):
    """POST /v2/models/{name}/infer takes the same fast path as /v1/predict; with it or without, the same
    answers, every error in the protocol's {"error": ...} form with /v1's statuses (401 with its header)."""
    body, binary = _oip_body(sky_cutouts(rng, 2))
    answers = {}
    for fast, app in with_and_without_fast_path(tiny_bundle):
        with TestClient(app) as client:
            auth = {"Authorization": "Bearer k"}
            calls = [client.post("/v2/models/photoz-test-tiny/infer", content=body, headers={**auth, **binary}),
                     client.post("/v2/models/photoz-test-tiny/versions/0.0.1/infer", content=body,
                                 headers={**auth, **binary}),
                     client.post("/v2/models/photoz-test-tiny/infer", content=body, headers=binary),
                     client.post("/v2/models/other/infer", content=body, headers={**auth, **binary}),
                     client.get("/v2/models/photoz-test-tiny"),
                     client.get("/v2/models/photoz-test-tiny", headers=auth),
                     client.get("/v2/health/live"), client.get("/v2")]
            answers[fast] = [(r.status_code, r.headers.get("www-authenticate"),
                              r.headers.get("inference-header-content-length"), r.content) for r in calls]
    assert [a[0] for a in answers[True]] == [200, 200, 401, 404, 401, 200, 200, 200]
    assert answers[True][2][1] == "Bearer" and json.loads(answers[True][2][3]).keys() == {"error"}
    head_length = int(answers[True][0][2])
    probs = np.frombuffer(answers[True][0][3][head_length:], np.float32).reshape(2, 180)
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert answers[True] == answers[False]


def test_oip_refusals_keep_v1s_status_and_retry_after():
    from photoz.service.errors import QueueFull
    from photoz.service.routes import oip_error as error_for

    response = error_for(QueueFull(64, 64, 2.4, close=True))
    assert response.status_code == 429 and response.headers["retry-after"] == "2"
    assert response.headers["connection"] == "close" and "queue holds 64 of 64" in json.loads(response.body)["error"]


def test_one_route_table_decides_dispatch_admission_declared_routes_and_error_form(tiny_bundle):
    """Every question about prediction paths is answered by photoz.service.routes: the app's declared POST
    routes are the table's paths, the fast dispatch and early admission match exactly them, and each protocol's
    paths get its own error form."""
    from photoz.service import routes
    from photoz.service.errors import QueueFull

    app = create_app(Settings(model=tiny_bundle, providers="cpu", warmup=False))
    declared = {r.path for r in app.routes if "POST" in getattr(r, "methods", set())}
    assert declared == {p for protocol in routes.PROTOCOLS for p in protocol.predict_paths}
    examples = {"/v1/predict": "v1", "/v2/models/m/infer": "v2", "/v2/models/m/versions/3/infer": "v2",
                "/v1/predict/x": None, "/v2/models/m/extra/infer": None, "/v2/models/m/ready": None}
    for path, protocol in examples.items():
        found = routes.prediction_protocol(path)
        assert (found.name if found else None) == protocol, path
        assert routes.is_prediction_path(path.encode()) == (protocol is not None)
        assert (routes.prediction_handler(path) is not None) == (protocol is not None)
    refusal = QueueFull(1, 1, 2.0)
    assert routes.render_error("/v2/models/m/infer", refusal).body.startswith(b'{"error"')
    assert routes.render_error("/v1/predict", refusal).media_type == "application/problem+json"
    assert routes.render_error("/healthz", refusal).media_type == "application/problem+json"
