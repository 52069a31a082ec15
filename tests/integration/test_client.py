"""The Python client against a real server."""
import threading

import numpy as np
import pytest
from astropy.io import fits

from photoz.service.client import PhotozClient, PhotozError
from tests.helpers import sky_cutouts


def test_arrays_in_chunks_with_concurrency_keep_order(server, tiny_predictor, rng):
    images = sky_cutouts(rng, 23)
    ebv = rng.uniform(0, 0.1, 23).astype(np.float32)
    with PhotozClient(server.url, chunk_size=5, max_concurrency=3) as client:
        results = client.predict(np.moveaxis(images, 1, -1), ebv=ebv, ids=[f"g{i}" for i in range(23)])
    assert results.ids == [f"g{i}" for i in range(23)]
    np.testing.assert_allclose(results.pdfs, tiny_predictor.predict(images, ebv), atol=1e-6)
    table = results.to_table()
    assert len(table) == 23 and table["pdf"].shape == (23, 180)
    assert table["z_mean"][4] == pytest.approx(results.estimates["z_mean"][4])
    ensemble = results.to_qp()
    assert ensemble.npdf == 23


def test_files_and_rejections(server, tiny_predictor, rng, tmp_path):
    a, b = sky_cutouts(rng, 2), sky_cutouts(rng, 2)
    b[0, 1, 5, 5] = np.nan
    fits.PrimaryHDU(a).writeto(tmp_path / "a.fits")
    np.save(tmp_path / "b.npy", b)
    with PhotozClient(server.url) as client:
        results = client.predict([tmp_path / "a.fits", tmp_path / "b.npy"])
    assert results.ids == ["a.fits:0", "a.fits:1", "b.npy:1"]
    assert results.rejected[0]["id"] == "b.npy:0" and "band g" in results.rejected[0]["error"]
    want = tiny_predictor.predict(np.concatenate([a, b[1:]]), np.zeros(3))
    np.testing.assert_allclose(results.pdfs, want, atol=1e-6)


def test_errors_raise_with_the_problem(server):
    with PhotozClient(server.url) as client, pytest.raises(PhotozError) as err:
        client.predict(np.zeros((2, 4, 64, 64), np.float32))
    assert err.value.status == 422 and "4 bands" in err.value.problem["received"]


def test_retries_after_429(tiny_bundle, tmp_path, rng):
    from photoz.service.live import LiveServer

    srv = LiveServer(tiny_bundle, tmp_path / "busy.log", max_queue_objects=40, max_batch_size=8)
    try:
        images = sky_cutouts(rng, 40)
        outcomes = []

        def run():
            with PhotozClient(srv.url, chunk_size=40, retries=20) as client:
                outcomes.append(len(client.predict(images, pdf=False)))

        threads = [threading.Thread(target=run) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert outcomes == [40] * 6  # every caller served despite the queue holding only one request
        assert 'photoz_requests_total{status="429"}' in __import__("httpx").get(srv.url + "/metrics").text
    finally:
        srv.stop()
