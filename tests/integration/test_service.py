"""The service through a real uvicorn server on 127.0.0.1, real FITS files, a real ORT session."""
import io
import json
import threading

import httpx
import numpy as np
import pytest
from astropy.io import fits

from tests.helpers import fits_bytes, npy_bytes, npz_bytes, sky_cutouts

NPY = {"Content-Type": "application/x-npy"}


def post(server, body, headers=None, **params):
    return httpx.post(server.url + "/v1/predict", content=body, headers=headers or NPY, params=params, timeout=60)


def expected(predictor, images, ebv=None):
    ebv = np.zeros(len(images), np.float32) if ebv is None else np.asarray(ebv, np.float32)
    return predictor.predict(images, ebv)


def pdfs_of(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array(response.json()["data"]["pdfs"])


# -- inputs -------------------------------------------------------------------

def test_single_npy_cutout_gives_the_engine_pdf_and_estimates(server, tiny_predictor, rng):
    image = sky_cutouts(rng, 1)[0]
    response = post(server, npy_bytes(image))
    doc = response.json()
    assert doc["n_objects"] == 1 and doc["pdf_name"] == "hist"
    assert len(doc["meta"]["bins"]) == 181
    np.testing.assert_allclose(pdfs_of(response)[0], expected(tiny_predictor, image[None])[0], atol=1e-6)
    from photoz.model.pdf import RedshiftBins, point_estimates

    est = point_estimates(expected(tiny_predictor, image[None]), RedshiftBins.uniform())
    assert doc["ancil"]["z_mean"][0] == pytest.approx(est["z_mean"][0], abs=1e-6)
    assert doc["ancil"]["z_lo95"][0] < doc["ancil"]["z_median"][0] < doc["ancil"]["z_hi95"][0]
    assert doc["model"]["name"] == "photoz-test-tiny" and len(doc["model"]["sha256"]) == 64


def test_stack_channel_last_and_big_endian(server, tiny_predictor, rng):
    images = sky_cutouts(rng, 5)
    want = expected(tiny_predictor, images)
    channel_last = np.moveaxis(images, 1, -1).astype(">f4")
    np.testing.assert_allclose(pdfs_of(post(server, npy_bytes(channel_last))), want, atol=1e-6)
    octet = post(server, npy_bytes(images.astype(np.float64)), {"Content-Type": "application/octet-stream"})
    np.testing.assert_allclose(pdfs_of(octet), want, atol=1e-6)


def test_npz_with_images_or_pasquet_data_key_ebv_and_ids(server, tiny_predictor, rng):
    images = sky_cutouts(rng, 3)
    ebv = np.array([0.01, 0.05, 0.2], np.float32)
    response = post(server, npz_bytes(images=images, ebv=ebv, ids=np.array(["a", "b", "c"])),
                    {"Content-Type": "application/x-npz"})
    np.testing.assert_allclose(pdfs_of(response), expected(tiny_predictor, images, ebv), atol=1e-6)
    assert response.json()["ancil"]["ids"] == ["a", "b", "c"]
    pasquet = post(server, npz_bytes(data=np.moveaxis(images, 1, -1)), {"Content-Type": "application/octet-stream"})
    np.testing.assert_allclose(pdfs_of(pasquet), expected(tiny_predictor, images), atol=1e-6)


def test_fits_cube_in_primary_or_first_extension_with_header_ebv(server, tiny_predictor, rng):
    images = sky_cutouts(rng, 2)
    primary = fits.PrimaryHDU(images)
    primary.header["EBV"] = 0.07
    want = expected(tiny_predictor, images, [0.07, 0.07])
    np.testing.assert_allclose(pdfs_of(post(server, fits_bytes([primary]), {"Content-Type": "application/fits"})),
                               want, atol=1e-6)
    single = fits_bytes([fits.PrimaryHDU(), fits.ImageHDU(images[0], name="CUTOUT")])
    np.testing.assert_allclose(pdfs_of(post(server, single, {"Content-Type": "image/fits"})),
                               expected(tiny_predictor, images[:1]), atol=1e-6)


def test_multi_extension_fits_one_hdu_per_band_in_any_order(server, tiny_predictor, rng):
    image = sky_cutouts(rng, 1)[0]
    hdus = [fits.PrimaryHDU()]
    for b in (3, 0, 4, 2, 1):  # i, u, z, r, g
        hdu = fits.ImageHDU(image[b].astype(">f8"))
        if b % 2:
            hdu.header["FILTER"] = "ugriz"[b]
        else:
            hdu.name = "ugriz"[b].upper()
        hdus.append(hdu)
    hdus[0].header["EBV"] = 0.03
    response = post(server, fits_bytes(hdus), {"Content-Type": "application/fits"})
    np.testing.assert_allclose(pdfs_of(response)[0], expected(tiny_predictor, image[None], [0.03])[0], atol=1e-6)


def test_compressed_fits(server, tiny_predictor, rng):
    image = sky_cutouts(rng, 1)[0]
    body = fits_bytes([fits.PrimaryHDU(), fits.CompImageHDU(image, compression_type="RICE_1")])
    with fits.open(io.BytesIO(body)) as hdul:  # float compression quantises: expect what the file holds
        stored = np.asarray(hdul[1].data, np.float32)
    assert isinstance(fits.open(io.BytesIO(body))[1], fits.CompImageHDU)
    assert 0 < np.abs(stored - image).max() < 0.05
    np.testing.assert_allclose(pdfs_of(post(server, body, {"Content-Type": "application/fits"}))[0],
                               expected(tiny_predictor, stored[None])[0], atol=1e-6)


def test_json_body(server, tiny_predictor, rng):
    image = sky_cutouts(rng, 1)
    body = json.dumps({"images": image.tolist(), "ebv": 0.02, "ids": ["gal-1"]})
    response = post(server, body, {"Content-Type": "application/json"})
    np.testing.assert_allclose(pdfs_of(response), expected(tiny_predictor, image, [0.02]), atol=1e-6)
    assert response.json()["ancil"]["ids"] == ["gal-1"]


def test_multipart_with_several_files_and_form_fields(server, tiny_predictor, rng):
    a, b = sky_cutouts(rng, 2), sky_cutouts(rng, 1)
    files = [("files", ("a.npy", npy_bytes(a), "application/octet-stream")),
             ("files", ("b.fits", fits_bytes([fits.PrimaryHDU(b)]), "application/fits"))]
    response = httpx.post(server.url + "/v1/predict", files=files, data={"ebv": "0.01,0.02,0.03"}, timeout=30)
    want = expected(tiny_predictor, np.concatenate([a, b]), [0.01, 0.02, 0.03])
    np.testing.assert_allclose(pdfs_of(response), want, atol=1e-6)
    assert response.json()["ancil"]["ids"] == ["a.npy:0", "a.npy:1", "b.fits:0"]


def test_query_ebv_and_ids(server, tiny_predictor, rng):
    images = sky_cutouts(rng, 2)
    response = post(server, npy_bytes(images), ebv="0.1,0.2", ids="x,y")
    np.testing.assert_allclose(pdfs_of(response), expected(tiny_predictor, images, [0.1, 0.2]), atol=1e-6)
    assert response.json()["ancil"]["ids"] == ["x", "y"]


# -- errors ---------------------------------------------------------------------

@pytest.mark.parametrize("shape,received", [
    ((5, 32, 32), "32x32"),
    ((4, 64, 64), "4 bands"),
    ((2, 64, 64, 3), "3 bands"),
    ((64, 64), "shape (64, 64)"),
])
def test_wrong_shapes_are_422_naming_field_expected_and_received(server, shape, received):
    response = post(server, npy_bytes(np.zeros(shape, np.float32)))
    assert response.status_code == 422
    problem = response.json()
    assert response.headers["content-type"].startswith("application/problem+json")
    assert problem["field"] == "body"
    assert "5 bands (u, g, r, i, z) of 64x64 pixels" in problem["expected"]
    assert received in problem["received"]


def test_empty_stack_and_empty_body(server):
    assert "0 cutouts" in post(server, npy_bytes(np.zeros((0, 5, 64, 64), np.float32))).json()["received"]
    response = post(server, b"", {"Content-Type": "application/fits"})
    assert response.status_code == 422 and response.json()["received"] == "0 bytes"


def test_non_finite_cutout_is_flagged_while_the_rest_succeed(server, tiny_predictor, rng):
    images = sky_cutouts(rng, 3)
    images[1, 2, 10, 10] = np.nan
    response = post(server, npy_bytes(images))
    doc = response.json()
    assert response.status_code == 200
    assert doc["ancil"]["ids"] == ["0", "2"]
    assert doc["rejected"] == [{"index": 1, "id": "1", "error": "non-finite pixel values (NaN or inf) in band r"}]
    np.testing.assert_allclose(np.array(doc["data"]["pdfs"]), expected(tiny_predictor, images[[0, 2]]), atol=1e-6)
    strict = post(server, npy_bytes(images), all_or_nothing="true")
    assert strict.status_code == 422 and "object 1" in strict.json()["received"]


def test_unreadable_files_are_400(server):
    for body, content_type in ((b"not a numpy file", "application/x-npy"), (b"PK\x03\x04junk", "application/x-npz"),
                               (b"SIMPLE  = garbage", "application/fits"), (b"{nope", "application/json")):
        response = post(server, body, {"Content-Type": content_type})
        assert response.status_code == 400, (content_type, response.text)
        assert response.json()["title"] in ("unreadable file", "unreadable body")


def test_pickled_npy_is_refused_not_loaded(server):
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    response = post(server, buffer.getvalue())
    assert response.status_code == 400 and "allow_pickle=False" in response.json()["detail"]


def test_truncated_npy_is_400_naming_the_problem(server, rng):
    body = npy_bytes(sky_cutouts(rng, 2))[:-100]
    response = post(server, body)
    assert response.status_code == 400 and response.json()["title"] == "unreadable file", response.text


def test_unsupported_media_type_is_415_and_bad_accept_is_406(server):
    response = post(server, b"hello", {"Content-Type": "text/plain"})
    assert response.status_code == 415 and response.json()["received"] == "text/plain"
    sniffed = post(server, b"hello", {"Content-Type": "application/octet-stream"})
    assert sniffed.status_code == 415
    response = post(server, npy_bytes(np.zeros((5, 64, 64), np.float32)), {**NPY, "Accept": "text/html"})
    assert response.status_code == 406


def test_fits_missing_a_band_names_it(server, rng):
    image = sky_cutouts(rng, 1)[0]
    hdus = [fits.PrimaryHDU()] + [fits.ImageHDU(image[b], name="ugriz"[b]) for b in range(4)]
    response = post(server, fits_bytes(hdus), {"Content-Type": "application/fits"})
    assert response.status_code == 422 and "no HDU for band(s) z" in response.json()["received"]


def test_bad_ebv_and_bad_query(server, rng):
    body = npy_bytes(sky_cutouts(rng, 2))
    response = post(server, body, ebv="0.1,0.2,0.3")
    assert response.status_code == 422 and response.json()["field"] == "ebv"
    response = post(server, body, ebv="-1")  # every object out of range: nothing to run
    assert response.status_code == 422 and "E(B-V) in 0-10 mag" in response.json()["expected"]
    assert "E(B-V) -1.0 is not a finite value in 0-10 mag" in response.json()["received"]
    response = post(server, body, ebv="0.1,12")  # one out of range: that object's entry in `rejected`
    assert response.status_code == 200 and response.json()["ancil"]["ids"] == ["0"]
    assert response.json()["rejected"] == [{"index": 1, "id": "1", "error": "E(B-V) 12.0 is not a finite value in "
                                                                           "0-10 mag"}]
    response = post(server, body, pdf="some")
    assert response.status_code == 422 and response.json()["field"] == "query.pdf"


def test_oversize_body_is_413_and_states_the_limit(tiny_bundle, tmp_path):
    from photoz.service.live import LiveServer

    srv = LiveServer(tiny_bundle, tmp_path / "small.log", max_body_mb=0.1)
    try:
        response = post(srv, npy_bytes(np.zeros((2, 5, 64, 64), np.float32)))
        assert response.status_code == 413
        assert response.json()["expected"] == "at most 104857 bytes (0 MiB)"
        assert post(srv, npy_bytes(np.zeros((5, 64, 64), np.float32))).status_code == 200
    finally:
        srv.stop()


# -- outputs --------------------------------------------------------------------

def test_json_builds_a_qp_ensemble(server, rng):
    import qp

    doc = post(server, npy_bytes(sky_cutouts(rng, 4))).json()
    ens = qp.Ensemble(qp.hist, data=dict(bins=np.array(doc["meta"]["bins"]), pdfs=np.array(doc["data"]["pdfs"])))
    assert ens.npdf == 4
    assert np.allclose(ens.mean().ravel(), doc["ancil"]["z_mean"], atol=2e-3)


def test_fits_table_output(server, tiny_predictor, rng):
    images = sky_cutouts(rng, 3)
    images[2, 0, 0, 0] = np.inf
    response = post(server, npy_bytes(images), {**NPY, "Accept": "application/fits"}, ids="p,q,r")
    assert response.headers["content-type"] == "application/fits"
    with fits.open(io.BytesIO(response.content)) as hdul:
        table = hdul["PHOTOZ"].data
        assert list(table["ID"]) == ["p", "q", "r"]
        assert list(table["VALID"]) == [True, True, False]
        np.testing.assert_allclose(table["PDF"][:2], expected(tiny_predictor, images[:2]), atol=1e-6)
        assert np.isnan(table["Z_MEAN"][2]) and "band u" in table["ERROR"][2]
        assert len(hdul["BINS"].data["Z_EDGES"]) == 181
        assert hdul[0].header["MODEL"] == "photoz-test-tiny"


def test_hdf5_output_is_read_by_qp(server, tiny_predictor, rng, tmp_path):
    import qp

    images = sky_cutouts(rng, 3)
    response = post(server, npy_bytes(images), {**NPY, "Accept": "application/x-hdf5"})
    path = tmp_path / "out.hdf5"
    path.write_bytes(response.content)
    ens = qp.read(str(path))
    assert ens.npdf == 3
    np.testing.assert_allclose(ens.objdata["pdfs"] / ens.objdata["pdfs"].sum(axis=1, keepdims=True),
                               expected(tiny_predictor, images), atol=1e-5)


def test_pdf_none_gives_point_estimates_only(server, rng):
    doc = post(server, npy_bytes(sky_cutouts(rng, 2)), pdf="none").json()
    assert "data" not in doc and len(doc["ancil"]["z_median"]) == 2


# -- batching, operations ---------------------------------------------------------

def test_concurrent_requests_get_their_own_results(server, tiny_predictor):
    rng = np.random.default_rng(7)
    requests = [sky_cutouts(rng, int(n)) for n in rng.integers(1, 12, 24)]
    wants = [expected(tiny_predictor, images) for images in requests]
    results = [None] * len(requests)

    def call(i):
        results[i] = post(server, npy_bytes(requests[i]))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, wants, strict=True):
        np.testing.assert_allclose(pdfs_of(got), want, atol=1e-6)
    # inputs are distinct, so a mix-up could not pass
    assert np.abs(wants[0][0] - wants[1][0]).max() > 1e-4
    metrics = httpx.get(server.url + "/metrics").text
    count = float(_metric(metrics, "photoz_batch_size_count"))
    total = float(_metric(metrics, "photoz_batch_size_sum"))
    assert total / count > 1.0  # requests were combined into batches
    # never above the bulk size (pieces of requests of more than max_batch_size = 8 cutouts may share 16)
    assert float(_metric(metrics, 'photoz_batch_size_bucket{le="16.0"}')) == count


def _metric(text: str, name: str) -> str:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{") and line.split(" ")[0] == name:
            return line.rsplit(" ", 1)[1]
    raise KeyError(name)


def test_large_request_is_split_across_batches(server, tiny_predictor, rng):
    images = sky_cutouts(rng, 30)  # max_batch_size is 8
    np.testing.assert_allclose(pdfs_of(post(server, npy_bytes(images))), expected(tiny_predictor, images), atol=1e-6)


def test_metrics_exposition(server, rng):
    post(server, npy_bytes(sky_cutouts(rng, 1)))
    post(server, b"x", {"Content-Type": "text/plain"})
    text = httpx.get(server.url + "/metrics").text
    for name in ("photoz_requests_total{status=\"200\"}", "photoz_requests_total{status=\"415\"}",
                 "photoz_request_latency_seconds_bucket", "photoz_queue_latency_seconds_bucket",
                 "photoz_compute_latency_seconds_bucket", "photoz_batch_size_bucket", "photoz_queue_depth",
                 "photoz_objects_total"):
        assert name in text, name
    assert float(_metric(text, "photoz_objects_total")) >= 1
    # whatever came before on this server (errors, disconnects, large requests), no reservation is left over
    assert float(_metric(text, "photoz_incoming_cutouts")) == 0


def test_models_health_and_ready(server):
    models = httpx.get(server.url + "/v1/models").json()["models"][0]
    assert models["name"] == "photoz-test-tiny" and models["bins"]["n_bins"] == 180
    assert models["metadata"]["architecture"]["name"] == "pasquet2019_tiny"
    assert models["provider"] == "CPUExecutionProvider"
    assert httpx.get(server.url + "/healthz").json() == {"status": "alive"}
    assert httpx.get(server.url + "/readyz").status_code == 200


def test_startup_log_names_the_provider_and_the_cpu_fallback(server):
    log = server.log()
    assert "execution provider: CPUExecutionProvider" in log
    assert "falling back to CPUExecutionProvider" in log
    assert "warmed up batch sizes [1, 2, 4, 8, 16]" in log  # 16: bulk batches (2 x max_batch_size on a CPU)
    assert "max_batch_size=8 (bulk 16)" in log


def test_api_key_auth(tiny_bundle, tmp_path, rng):
    from photoz.service.live import LiveServer

    srv = LiveServer(tiny_bundle, tmp_path / "auth.log", env={"PHOTOZ_API_KEYS": "k1,k2"})
    try:
        body = npy_bytes(sky_cutouts(rng, 1))
        denied = post(srv, body)
        assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
        assert post(srv, body, {**NPY, "Authorization": "Bearer wrong"}).status_code == 401
        assert post(srv, body, {**NPY, "Authorization": "Bearer k2"}).status_code == 200
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert httpx.get(srv.url + "/healthz").status_code == 200  # probes stay open
    finally:
        srv.stop()


def test_request_beyond_the_queue_capacity_is_413_stating_the_maximum(tiny_bundle, tmp_path, rng):
    """A request that could never fit gets 413 naming the maximum (a 429 would invite endless retries)."""
    from photoz.service.live import LiveServer

    srv = LiveServer(tiny_bundle, tmp_path / "queue.log", max_queue_objects=16, max_batch_size=4)
    try:
        response = post(srv, npy_bytes(sky_cutouts(rng, 20)))
        assert response.status_code == 413 and "retry-after" not in response.headers
        assert "at most 16 cutouts" in response.json()["expected"] and response.json()["received"] == "20 cutouts"
        assert post(srv, npy_bytes(sky_cutouts(rng, 16))).status_code == 200
    finally:
        srv.stop()


def test_expired_deadline_is_dropped_before_the_model(server, rng):
    # a deadline of a microsecond has passed by the time the batcher's loop takes the cutout, even on an idle
    # engine that takes a lone request at once (the loop runs on a later turn of the event loop)
    before = float(_metric(httpx.get(server.url + "/metrics").text, "photoz_objects_total"))
    response = post(server, npy_bytes(sky_cutouts(rng, 1)), deadline_ms="0.001")
    assert response.status_code == 504 and response.json()["title"] == "deadline exceeded"
    after = float(_metric(httpx.get(server.url + "/metrics").text, "photoz_objects_total"))
    assert after == before  # the expired cutout never reached the model
    assert post(server, npy_bytes(sky_cutouts(rng, 1)), deadline_ms="5000").status_code == 200


def test_sigterm_drains_in_flight_work_then_exits_0(tiny_bundle, tmp_path, rng):
    from photoz.service.live import LiveServer

    srv = LiveServer(tiny_bundle, tmp_path / "drain.log", max_batch_size=4)
    images = sky_cutouts(rng, 400)
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=post(srv, npy_bytes(images))))
    worker.start()
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until the request is queued or running
        metrics = httpx.get(srv.url + "/metrics").text
        if float(_metric(metrics, "photoz_queue_depth")) > 0 or float(_metric(metrics, "photoz_objects_total")) > 0:
            break
        time.sleep(0.01)
    code = srv.stop()
    worker.join()
    assert result["r"].status_code == 200 and len(result["r"].json()["data"]["pdfs"]) == 400
    assert code == 0
    assert "draining" in srv.log() and "drained and stopped" in srv.log()


def test_disconnected_client_work_is_dropped_before_the_model(tiny_bundle, rng):
    """A real uvicorn server (in this process) whose engine blocks until released: the client sends 600 cutouts
    and goes away while the first batch is in the model; once released, the model ran that batch only, the
    queue is empty and the request is counted as 499. No timing assumption: the engine waits for the test."""
    import asyncio
    import time

    import uvicorn

    from photoz.service.app import create_app
    from photoz.service.live import free_port
    from photoz.service.settings import Settings

    port = free_port()
    app = create_app(Settings(model=tiny_bundle, providers="cpu", warmup=False, max_batch_size=2,
                              max_bulk_batch_size=2, inference_workers=1, port=port))
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    release, entered, ran = threading.Event(), threading.Event(), []

    def blocking(images, ebv):
        entered.set()
        assert release.wait(60), "never released"
        ran.append(len(images))
        return real(images, ebv)

    try:
        deadline = time.monotonic() + 60
        while app.state.photoz.engine is None or not server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        batcher = app.state.photoz.engine.batcher
        real, batcher.infer, batcher.infer_alone = batcher.infer, blocking, None

        async def send_and_leave():
            async with httpx.AsyncClient() as client:
                request = asyncio.ensure_future(client.post(f"http://127.0.0.1:{port}/v1/predict", headers=NPY,
                                                            content=npy_bytes(sky_cutouts(rng, 600)), timeout=60))
                while not entered.is_set():  # the first batch is in the model, the rest queued
                    await asyncio.sleep(0.01)
                request.cancel()  # the client goes away: its connection closes

        asyncio.run(send_and_leave())
        text = ""
        for _ in range(6000):  # the server notices the disconnect and answers 499 (poll, not a fixed wait)
            text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            if 'photoz_requests_total{status="499"}' in text:
                break
            time.sleep(0.01)
        assert 'photoz_requests_total{status="499"}' in text
        release.set()
        for _ in range(6000):
            if float(_metric(httpx.get(f"http://127.0.0.1:{port}/metrics").text, "photoz_queue_depth")) == 0:
                break
            time.sleep(0.01)
        assert ran == [2]  # the batch already in the model; the other 598 cutouts were dropped unrun
        assert float(_metric(httpx.get(f"http://127.0.0.1:{port}/metrics").text, "photoz_queue_depth")) == 0
    finally:
        release.set()
        server.should_exit = True
        thread.join(30)


def test_lone_batch_runs_on_the_wide_engine_concurrent_batches_on_the_narrow():
    """Light load: a batch alone with nothing queued takes infer_alone; under load the shared engine."""
    import asyncio
    import time as _time

    from photoz.service.batcher import Batcher

    used = []

    def engine(name):
        def infer(images, ebv):
            used.append(name)
            _time.sleep(0.05)
            return {"probs": images.reshape(len(images), -1)[:, :1]}
        return infer

    async def scenario():
        batcher = Batcher(engine("narrow"), max_batch_size=2, max_queue_delay_s=0.001, max_queue_objects=100,
                          workers=2, infer_alone=engine("wide"))
        batcher.start()
        one = np.ones((1, 5, 4, 4), np.float32)
        out = await batcher.submit(one, np.zeros(1, np.float32), 5.0)
        assert out["probs"].shape == (1, 1) and used == ["wide"]
        used.clear()
        stack = np.arange(12 * 80, dtype=np.float32).reshape(12, 5, 4, 4)
        results = await asyncio.gather(*(batcher.submit(stack[i:i + 3], np.zeros(3, np.float32), 5.0)
                                         for i in range(0, 12, 3)))
        for i, r in enumerate(results):  # rows back to the right caller, whichever engine ran them
            assert np.array_equal(r["probs"][:, 0], stack[3 * i:3 * i + 3, 0, 0, 0])
        # 4 requests of 3 = 8 pieces of <= 2; only a last batch left alone may take the wide engine
        assert len(used) == 8 and used.count("narrow") >= 7, used
        await batcher.close()

    asyncio.run(scenario())


def test_startup_log_states_the_threads(server):
    import os

    log = server.log()
    assert "threads_per_batch=" in log
    if (os.cpu_count() or 1) > 1:  # a second, all-core session for lone batches
        assert f"threads_when_alone={os.cpu_count()}" in log
