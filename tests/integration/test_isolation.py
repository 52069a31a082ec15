"""One bad object never fails another: real uvicorn servers, real ONNX Runtime sessions, concurrent clients.

With the shipped bundle, cutouts carrying mask sentinels (1e30, -1e30, float32's maximum) are refused before they
can join a batch. With a bundle whose graph really fails on one input (an E(B-V) of 8 or more indexes past the end
of a GatherElements, as a NaN once did in the PIT map), the failed model call is bisected: over /v1, /v2, offline
and on Dask only that cutout is rejected.
"""
import asyncio

import httpx
import numpy as np
import pytest
from astropy.table import Table

from photoz.model.bundle import default_bundle_path
from photoz.model.conventions import MAX_ABS_PIXEL_NMGY
from photoz.pipeline.jobs import PredictJob
from photoz.service.live import LiveServer
from tests.helpers import disk_galaxies, npy_bytes, sky_cutouts

#: E(B-V) from which the poisoned graph fails (valid input: 0-10 mag).
POISON_EBV = 9.0


def post_v1(client, url, images, ebv=None, request_id=None):
    params = {"ebv": ",".join(str(float(e)) for e in ebv)} if ebv is not None else {}
    headers = {"Content-Type": "application/x-npy", **({"X-Request-ID": request_id} if request_id else {})}
    return client.post(url + "/v1/predict", content=npy_bytes(images), headers=headers, params=params, timeout=120)


async def post_all(url, bodies):
    """Every request at once (each ``(images, ebv, request_id)``): they share the server's batches."""
    async with httpx.AsyncClient() as client:
        return await asyncio.gather(*(post_v1(client, url, *body) for body in bodies))


def metric(server, name):
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


@pytest.fixture(scope="module")
def shipped_server(tmp_path_factory):
    srv = LiveServer(default_bundle_path(), tmp_path_factory.mktemp("logs") / "shipped.log", max_batch_size=32,
                     max_queue_delay_ms=300, max_queue_wait_ms=30_000,
                     wait_when_idle=True)  # the first request waits too: the clients' requests share batches
    yield srv
    srv.stop()


def test_mask_sentinels_in_concurrent_requests_change_nobody_elses_pdfs(shipped_server, rng):
    """Six clients at once, three of them sending 1e30, -1e30, 3.4e38, a subnormal-only and an all-zero cutout:
    every galaxy's PDF equals that of the same cutout sent alone; the sentinel cutouts are rejected naming the
    band and value; the subnormal and all-zero cutouts are no error (finite PDFs; the empty one is flagged)."""
    galaxies, _ = disk_galaxies(rng, 9)
    mixed = galaxies[6:9].copy()
    mixed[1, 2, 30, 30] = 1e30
    sentinels = galaxies[:2].copy()
    sentinels[0, 0, 5:9, 5:9], sentinels[1, 4] = -1e30, 3.4e38
    empty = np.stack([np.full((5, 64, 64), 1e-41, np.float32), np.zeros((5, 64, 64), np.float32)])
    bodies = [(galaxies[0:3], None, "clean-1"), (mixed, None, "mixed"), (galaxies[3:6], None, "clean-2"),
              (sentinels, None, "sentinels"), (empty, None, "empty"), (galaxies[2:4], None, "clean-3")]
    batches_before = metric(shipped_server, "photoz_batch_size_count")
    answers = asyncio.run(post_all(shipped_server.url, bodies))
    assert metric(shipped_server, "photoz_batch_size_count") - batches_before < len(bodies)  # requests shared batches
    with httpx.Client() as client:
        alone = {i: np.array(post_v1(client, shipped_server.url, galaxies[i:i + 1]).json()["data"]["pdfs"][0])
                 for i in range(9)}
    docs = {body[2]: answer.json() for body, answer in zip(bodies, answers, strict=True)}
    assert answers[3].status_code == 422 and "object 0" in docs["sentinels"]["received"]  # every object refused
    received = docs["sentinels"]["received"]
    assert "object 1" in received and "band z (3.4e+38 nanomaggies)" in received
    for name, rows in (("clean-1", [0, 1, 2]), ("clean-2", [3, 4, 5]), ("clean-3", [2, 3]), ("mixed", [6, 8])):
        assert docs[name]["rejected"] == [] or name == "mixed"
        np.testing.assert_allclose(np.array(docs[name]["data"]["pdfs"]), np.stack([alone[i] for i in rows]),
                                   atol=1e-6, err_msg=name)
    [rejected] = docs["mixed"]["rejected"]
    assert rejected["index"] == 1 and "band r (1e+30 nanomaggies)" in rejected["error"]
    assert f"|f| > {MAX_ABS_PIXEL_NMGY:.0e}" in rejected["error"]
    assert docs["empty"]["rejected"] == [] and np.isfinite(np.array(docs["empty"]["data"]["pdfs"])).all()
    assert "masked_pixels" in docs["empty"]["ancil"]["flags"][1]
    assert metric(shipped_server, "photoz_batches_bisected_total") == 0  # refused before batching: nothing failed


@pytest.fixture(scope="module")
def poisoned_bundle(tiny_bundle, tmp_path_factory):
    """The tiny bundle with probabilities + 0 * GatherElements(zeros (N, 2), floor(ebv / 4)): the same PDFs, but
    ONNX Runtime fails the whole call when any cutout's E(B-V) is 8 or more (its index is past the end)."""
    import onnx
    from onnx import TensorProto, helper

    proto = onnx.load(str(tiny_bundle))
    graph = proto.graph
    out = graph.output[0].name
    producer = next(node for node in graph.node if out in node.output)
    producer.output[list(producer.output).index(out)] = "raw_probabilities"
    graph.initializer.append(helper.make_tensor("four", TensorProto.FLOAT, [], [4.0]))
    graph.node.extend([
        helper.make_node("Div", ["ebv", "four"], ["quarter"]), helper.make_node("Floor", ["quarter"], ["floored"]),
        helper.make_node("Cast", ["floored"], ["index"], to=TensorProto.INT64),
        helper.make_node("Sub", ["ebv", "ebv"], ["zero"]),
        helper.make_node("Concat", ["zero", "zero"], ["pair"], axis=1),
        helper.make_node("GatherElements", ["pair", "index"], ["picked"], axis=1),
        helper.make_node("Add", ["raw_probabilities", "picked"], [out])])
    path = tmp_path_factory.mktemp("poisoned") / "poisoned.onnx"
    onnx.save(proto, str(path))
    return path


@pytest.fixture(scope="module")
def poisoned_server(poisoned_bundle, tmp_path_factory):
    srv = LiveServer(poisoned_bundle, tmp_path_factory.mktemp("logs") / "poisoned.log", max_batch_size=32,
                     max_queue_delay_ms=300, max_queue_wait_ms=30_000,
                     wait_when_idle=True)  # the first request waits too: the clients' requests share batches
    yield srv
    srv.stop()


def test_a_cutout_the_model_fails_on_fails_alone_over_v1_and_v2(poisoned_server, tiny_predictor, rng):
    images = sky_cutouts(rng, 7)
    ebv = np.array([0.1, POISON_EBV, 0.2, 0.05, 0.3, 0.0, 0.15], np.float32)

    async def clients():
        async with httpx.AsyncClient() as client:
            v2 = {"id": "v2-culprit", "inputs": [
                {"name": "images", "datatype": "FP32", "shape": [2, 5, 64, 64], "data": images[5:7].ravel().tolist()},
                {"name": "ebv", "datatype": "FP32", "shape": [2, 1], "data": [POISON_EBV, 0.15]}]}
            return await asyncio.gather(
                post_v1(client, poisoned_server.url, images[0:3], ebv[0:3], "v1-culprit"),
                post_v1(client, poisoned_server.url, images[3:5], ebv[3:5], "v1-clean"),
                client.post(poisoned_server.url + "/v2/models/photoz-test-tiny/infer", json=v2, timeout=120))

    v1_bad, v1_clean, v2_bad = asyncio.run(clients())
    assert v1_bad.status_code == v1_clean.status_code == v2_bad.status_code == 200, v2_bad.text
    want = tiny_predictor.predict(images, np.where(ebv >= 8, 0, ebv))  # the poisoned graph's PDFs are the tiny's
    doc = v1_bad.json()
    assert doc["ancil"]["ids"] == ["0", "2"] and [r["index"] for r in doc["rejected"]] == [1]
    assert "the model failed on this cutout alone" in doc["rejected"][0]["error"]
    np.testing.assert_allclose(np.array(doc["data"]["pdfs"]), want[[0, 2]], atol=1e-6)
    np.testing.assert_allclose(np.array(v1_clean.json()["data"]["pdfs"]), want[3:5], atol=1e-6)
    outputs = {o["name"]: o for o in v2_bad.json()["outputs"]}
    assert outputs["valid"]["data"] == [False, True] and "failed on this cutout alone" in outputs["problem"]["data"][0]
    np.testing.assert_allclose(np.array(outputs["probabilities"]["data"], float).reshape(2, -1)[1], want[6], atol=1e-6)
    assert metric(poisoned_server, "photoz_objects_failed_alone_total") == 2
    assert metric(poisoned_server, "photoz_batches_bisected_total") >= 1
    assert metric(poisoned_server, 'photoz_requests_total{status="500"}') == 0
    log = poisoned_server.log()
    assert "v1-culprit" in log and "v2-culprit" in log and "bisected" in log and "out of range" in log.lower()


@pytest.mark.parametrize("dask", [None, pytest.param("local:1", marks=pytest.mark.slow)], ids=["here", "dask"])
def test_offline_predict_rejects_the_culprit_row_and_goes_on(poisoned_bundle, tiny_predictor, tmp_path, rng, dask):
    import h5py

    from photoz.pipeline.predict import predict_files

    images, ebv = sky_cutouts(rng, 10), np.full(10, 0.05, np.float32)
    ebv[6] = POISON_EBV
    with h5py.File(tmp_path / "in.h5", "w") as h5:
        h5["images"], h5["ebv"] = images, ebv
    summary = predict_files(PredictJob([tmp_path / "in.h5"], tmp_path / "out.fits", model=poisoned_bundle,
                                       chunk_size=5, batch_size=4, quiet=True, dask=dask))
    table = Table.read(tmp_path / "out.fits", hdu="PHOTOZ")
    assert summary["objects"] == 10 and np.flatnonzero(~np.asarray(table["VALID"])).tolist() == [6]
    assert "the model failed on this cutout alone" in table["ERROR"][6]
    good = np.asarray(table["VALID"])
    np.testing.assert_allclose(np.asarray(table["PDF"])[good], tiny_predictor.predict(images, ebv)[good], atol=1e-6)
