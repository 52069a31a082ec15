"""The Open Inference Protocol (KServe v2) through the real clients, tritonclient and the kserve SDK, against a
real uvicorn server: the same PDFs as /v1/predict, the binary tensor extension, metadata, readiness, errors."""
import asyncio
import gzip
import json

import httpx
import numpy as np
import pytest

from photoz.model.pdf import ESTIMATES
from tests.helpers import npy_bytes, sky_cutouts

tritonhttp = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL, VERSION = "photoz-test-tiny", "0.0.1"


def v1(server, images, ebv=None):
    params = {"ebv": ",".join(str(float(e)) for e in ebv)} if ebv is not None else {}
    response = httpx.post(server.url + "/v1/predict", content=npy_bytes(images),
                          headers={"Content-Type": "application/x-npy"}, params=params, timeout=60)
    assert response.status_code == 200, response.text
    doc = response.json()
    return np.array(doc["data"]["pdfs"]), doc["ancil"]


@pytest.fixture(scope="module")
def triton(server):
    client = tritonhttp.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


def triton_inputs(images, ebv=None, binary=True, datatype="FP32"):
    tensor = tritonhttp.InferInput("images", list(images.shape), datatype)
    tensor.set_data_from_numpy(images.astype(np.float16 if datatype == "FP16" else np.float32), binary_data=binary)
    inputs = [tensor]
    if ebv is not None:
        e = tritonhttp.InferInput("ebv", [len(ebv), 1], "FP32")
        e.set_data_from_numpy(np.asarray(ebv, np.float32).reshape(-1, 1), binary_data=binary)
        inputs.append(e)
    return inputs


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_gets_the_pdfs_and_estimates_of_v1(server, triton, rng, binary):
    images = sky_cutouts(rng, 5)
    ebv = np.array([0.0, 0.02, 0.05, 0.1, 0.3])
    outputs = [tritonhttp.InferRequestedOutput(name, binary_data=binary) for name in ("probabilities", *ESTIMATES)]
    result = triton.infer(MODEL, triton_inputs(images, ebv, binary), outputs=outputs, request_id="req-7")
    pdfs, ancil = v1(server, images, ebv)
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (5, 180) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, pdfs, atol=1e-6)
    for key in ESTIMATES:
        assert result.as_numpy(key).shape == (5, 1)
        # (z_epistemic_std: NaN for this single network, null in /v1's JSON)
        np.testing.assert_allclose(result.as_numpy(key)[:, 0], np.asarray(ancil[key], float), atol=1e-6)
    assert result.get_response()["id"] == "req-7" and result.get_response()["model_name"] == MODEL
    # E(B-V) reaches the model: the same cutouts without it give other PDFs
    assert not np.allclose(triton.infer(MODEL, triton_inputs(images)).as_numpy("probabilities")[1:], pdfs[1:],
                           atol=1e-6)


def test_all_outputs_by_default_with_validity_flags_and_problems(server, triton, rng):
    """No outputs named: tritonclient asks for every output as binary. A cutout with a NaN band is not run:
    valid false, NaN row, its reason in ``problem``; the other rows are as /v1 gives them."""
    images = sky_cutouts(rng, 3)
    images[1, 3, 5, 5] = np.nan
    result = triton.infer(MODEL, triton_inputs(images), model_version=VERSION)
    names = {o["name"] for o in result.get_response()["outputs"]}
    assert names == {"probabilities", *ESTIMATES, "valid", "flags", "problem"}
    assert result.as_numpy("valid")[:, 0].tolist() == [True, False, True]
    problems = [p.decode() for p in result.as_numpy("problem")[:, 0]]
    assert problems[0] == problems[2] == "" and "non-finite" in problems[1] and "band i" in problems[1]
    assert np.isnan(result.as_numpy("probabilities")[1]).all()
    pdfs, _ = v1(server, images[[0, 2]])
    np.testing.assert_allclose(result.as_numpy("probabilities")[[0, 2]], pdfs, atol=1e-6)
    assert result.as_numpy("flags").shape == (3, 1)


def test_float16_images_and_a_gzip_body(server, triton, rng):
    images = sky_cutouts(rng, 4)
    want, _ = v1(server, images.astype(np.float16).astype(np.float32))
    half = triton.infer(MODEL, triton_inputs(images, datatype="FP16"))
    np.testing.assert_allclose(half.as_numpy("probabilities"), want, atol=1e-6)
    squeezed = triton.infer(MODEL, triton_inputs(images, datatype="FP16"), request_compression_algorithm="gzip")
    np.testing.assert_allclose(squeezed.as_numpy("probabilities"), want, atol=1e-6)


def test_tritonclient_metadata_config_and_readiness(server, triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(MODEL) and triton.is_model_ready(MODEL, VERSION)
    assert not triton.is_model_ready("other-model")
    server_md = triton.get_server_metadata()
    assert server_md["name"] == "photoz" and "binary_tensor_data" in server_md["extensions"]
    md = triton.get_model_metadata(MODEL)
    assert md["name"] == MODEL and md["versions"] == [VERSION]
    assert {t["name"]: (t["datatype"], t["shape"]) for t in md["inputs"]} == {
        "images": ("FP32", [-1, 5, 64, 64]), "ebv": ("FP32", [-1, 1])}
    outputs = {t["name"]: (t["datatype"], t["shape"]) for t in md["outputs"]}
    assert outputs["probabilities"] == ("FP32", [-1, 180]) and outputs["z_median"] == ("FP32", [-1, 1])
    assert len(md["parameters"]["z_bin_edges"]) == 181
    config = triton.get_model_config(MODEL)
    assert config["max_batch_size"] == 8 and config["input"][0]["dims"] == [5, 64, 64]
    assert [t.get("optional", False) for t in config["input"]] == [False, True]


def test_errors_are_the_protocols_with_v1s_statuses(server, triton, rng):
    images = sky_cutouts(rng, 2)
    with pytest.raises(InferenceServerException) as unknown:
        triton.infer("no-such-model", triton_inputs(images))
    assert unknown.value.status() == "404" and MODEL in unknown.value.message()
    with pytest.raises(InferenceServerException) as version:
        triton.infer(MODEL, triton_inputs(images), model_version="9")
    assert version.value.status() == "404"
    with pytest.raises(InferenceServerException) as shape:
        triton.infer(MODEL, triton_inputs(images[:, :3]))
    assert shape.value.status() == "422" and "3 bands" in shape.value.message()
    with pytest.raises(InferenceServerException) as deadline:  # Triton's timeout parameter, in microseconds
        triton.infer(MODEL, triton_inputs(sky_cutouts(rng, 8)), timeout=1)
    assert deadline.value.status() == "504"
    url = f"{server.url}/v2/models/{MODEL}/infer"
    head = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 5, 64, 64],
                                   "parameters": {"binary_data_size": 5 * 64 * 64 * 4}}]}).encode()
    cases = [  # (body, headers, status, words in the error)
        (head + b"\0" * 100, {"Inference-Header-Content-Length": str(len(head))}, 400, "binary_data_size"),
        (head + b"\0" * (5 * 64 * 64 * 4 + 4), {"Inference-Header-Content-Length": str(len(head))}, 400, "bytes"),
        (head, {"Inference-Header-Content-Length": "99999999"}, 400, "Inference-Header-Content-Length"),
        (b"{not json", {}, 400, "JSON"),
        (json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1], "data": [1]}]}).encode(), {},
         400, "inputs[0].name"),
        (json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}).encode(),
         {}, 400, "datatype"),
        (json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 5, 64, 64],
                                 "data": [0.0] * 7}]}).encode(), {}, 400, "20480 values"),
        (json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 5, 64, 64], "data": [0.0] * 20480}],
                     "outputs": [{"name": "z_best"}]}).encode(), {}, 400, "outputs[0].name"),
        (json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [0, 41, 275519, 292238, 698486],
                                 "data": []}]}).encode(), {}, 400, "inputs[0].shape"),  # found by test_fuzz
        (gzip.compress(b"x")[:-3], {"Content-Encoding": "gzip"}, 400, "truncated"),
        (b"{}", {"Content-Encoding": "br"}, 415, "Content-Encoding"),
    ]
    for body, headers, status, words in cases:
        response = httpx.post(url, content=body, headers=headers, timeout=30)
        assert response.status_code == status, (words, response.text)
        assert response.headers["content-type"] == "application/json" and words in response.json()["error"], \
            response.text
    missing = httpx.get(server.url + "/v2/models/no-such-model", timeout=30)
    assert missing.status_code == 404 and "error" in missing.json()
    assert httpx.get(server.url + "/v2/no/such/route", timeout=30).json().keys() == {"error"}
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    assert 'photoz_requests_total{status="504"}' in metrics and 'photoz_requests_total{status="422"}' in metrics


def test_kserve_rest_client_gets_the_pdfs_of_v1(server, rng):
    kserve = pytest.importorskip("kserve")
    from kserve.protocol.infer_type import RequestedOutput
    images = sky_cutouts(rng, 3)
    ebv = np.array([[0.01], [0.2], [0.05]], np.float32)
    pdfs, ancil = v1(server, images, ebv[:, 0])

    async def call():
        client = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2", timeout=60))
        try:
            assert await client.is_server_live(server.url) and await client.is_server_ready(server.url)
            assert await client.is_model_ready(server.url, MODEL)
            answers = {}
            for binary in (True, False):
                inputs = [kserve.InferInput("images", list(images.shape), "FP32"),
                          kserve.InferInput("ebv", list(ebv.shape), "FP32")]
                inputs[0].set_data_from_numpy(images, binary_data=binary)
                inputs[1].set_data_from_numpy(ebv, binary_data=binary)
                wanted = [RequestedOutput(name, {"binary_data": binary}) for name in ("probabilities", "z_mean")]
                request = kserve.InferRequest(MODEL, inputs, request_id=f"k-{binary}", request_outputs=wanted)
                headers = {}
                answers[binary] = await client.infer(server.url, request, model_name=MODEL, response_headers=headers)
                assert ("inference-header-content-length" in headers) == binary  # binary outputs came back
            return answers
        finally:
            await client.close()

    for binary, response in asyncio.run(call()).items():
        by_name = {o.name: o.as_numpy() for o in response.outputs}
        np.testing.assert_allclose(by_name["probabilities"], pdfs, atol=1e-6, err_msg=f"binary={binary}")
        np.testing.assert_allclose(by_name["z_mean"][:, 0], ancil["z_mean"], atol=1e-6)
