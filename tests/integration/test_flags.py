"""Quality flags end to end: a bundle with thresholds, served (JSON, FITS, /v1/models), offline (Parquet,
through the service too), and written into a bundle by `photoz ood-thresholds`."""
import io
import shutil
import subprocess
import sys

import h5py
import httpx
import numpy as np
import pytest
from astropy.io import fits

from photoz.model.conventions import BANDS, PIXEL_SCALE_ARCSEC
from photoz.model.features import cutout_features
from photoz.model.quality import FLAG_BITS, quality_metadata
from photoz.pipeline.jobs import PredictJob
from tests.helpers import disk_galaxies, npy_bytes, star

# one pytest-xdist worker runs this module (make test), so its module fixtures (flagged_bundle, ...) are built once
pytestmark = pytest.mark.xdist_group("test_flags")


@pytest.fixture(scope="module")
def flagged_bundle(tiny_bundle, tmp_path_factory):
    """The tiny bundle with thresholds measured on synthetic disks."""
    from photoz.model.bundle import load_bundle
    from photoz.model.network.export import write_metadata

    images, ebv = disk_galaxies(np.random.default_rng(7), 2000)
    quality = quality_metadata(cutout_features(images, ebv, BANDS, PIXEL_SCALE_ARCSEC), {"dataset": "disks"})
    path = tmp_path_factory.mktemp("flagged") / "tiny-flagged.onnx"
    document = {**load_bundle(tiny_bundle).metadata.document, "quality": quality}
    return write_metadata(tiny_bundle, document, path).path


@pytest.fixture(scope="module")
def probes():
    """[a galaxy, the same with a zero-filled strip, a star, the galaxy at E(B-V) 1]: what each should say."""
    rng = np.random.default_rng(3)
    galaxy, _ = disk_galaxies(rng, 1, r_mag=(16.5, 16.5), scale_px=(2.5, 2.5))
    masked = galaxy.copy()
    masked[0, 3, 20:24, :] = 0.0
    images = np.concatenate([galaxy, masked, star(rng, 16.0), galaxy])
    ebv = np.array([0.03, 0.03, 0.03, 1.0], np.float32)
    return images, ebv, [[], ["masked_pixels"], ["point_source"], ["ebv_above_training"]]


@pytest.fixture(scope="module")
def flag_server(flagged_bundle, tmp_path_factory):
    from photoz.service.live import LiveServer

    srv = LiveServer(flagged_bundle, tmp_path_factory.mktemp("flaglogs") / "server.log", max_batch_size=8)
    yield srv
    srv.stop()


def test_served_json_and_fits_carry_the_flags(flag_server, probes):
    images, ebv, want = probes
    params = {"ebv": ",".join(str(float(e)) for e in ebv)}
    doc = httpx.post(flag_server.url + "/v1/predict", content=npy_bytes(images), params=params,
                     headers={"Content-Type": "application/x-npy"}, timeout=60).json()
    assert doc["ancil"]["flags"] == want
    response = httpx.post(flag_server.url + "/v1/predict", content=npy_bytes(images), params=params, timeout=60,
                          headers={"Content-Type": "application/x-npy", "Accept": "application/fits"})
    with fits.open(io.BytesIO(response.content)) as hdul:
        table = hdul["PHOTOZ"].data
        assert list(table["FLAGS"]) == [",".join(w) for w in want]
        assert list(table["FLAG_BITS"]) == [sum(FLAG_BITS[f] for f in w) for w in want]
        assert hdul[0].header["FLAGBIT6"] == "masked_pixels"
    model = httpx.get(flag_server.url + "/v1/models").json()["models"][0]
    assert model["metadata"]["quality"]["thresholds"]["ebv_max"] < 1.0


def test_offline_tables_carry_the_same_flags_here_and_through_the_service(flagged_bundle, flag_server, probes,
                                                                          tmp_path):
    import pyarrow.parquet as pq

    from photoz.pipeline.predict import predict_files

    images, ebv, want = probes
    with h5py.File(tmp_path / "in.h5", "w") as h5:
        h5["images"], h5["ebv"] = images, ebv
    bits = [sum(FLAG_BITS[f] for f in w) for w in want]
    predict_files(PredictJob([tmp_path / "in.h5"], tmp_path / "here.parquet", model=flagged_bundle, quiet=True))
    here = pq.read_table(tmp_path / "here.parquet").to_pydict()
    assert here["flag_bits"] == bits and here["flags"] == [",".join(w) for w in want]
    predict_files(PredictJob([tmp_path / "in.h5"], tmp_path / "there.parquet", url=flag_server.url, quiet=True))
    assert pq.read_table(tmp_path / "there.parquet").to_pydict()["flag_bits"] == bits


def test_ood_thresholds_command_writes_them_into_a_bundle(tiny_bundle, tmp_path):
    from photoz.model.bundle import load_bundle

    images, ebv = disk_galaxies(np.random.default_rng(1), 300)
    with h5py.File(tmp_path / "train.h5", "w") as h5:
        h5["images"], h5["ebv"], h5["z"] = images, ebv, np.full(300, 0.1)
    bundle = tmp_path / "b.onnx"
    shutil.copy(tiny_bundle, bundle)
    before = load_bundle(bundle)
    assert before.metadata.quality is None
    run = subprocess.run([sys.executable, "-m", "photoz", "ood-thresholds", "--model", str(bundle), "--data",
                          str(tmp_path / "train.h5"), "--version", "0.0.2"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    after = load_bundle(bundle)
    quality = after.metadata.quality
    assert quality["reference"] == {"dataset": "train.h5", "rows": "first 300 of 300", "n_objects": 300}
    assert after.metadata.version == "0.0.2" and after.sha256 != before.sha256
    features = cutout_features(images, ebv, BANDS, PIXEL_SCALE_ARCSEC)
    assert quality["thresholds"]["r_mag_min"] == pytest.approx(np.quantile(features["r_mag"], 0.001))
    assert "blend_score_max" in quality["thresholds"] and "300 cutouts" in quality["blend_net"]["trained_on"]


def test_a_bundle_with_a_blend_detector_flags_pairs_the_same_served_and_offline(tiny_bundle, tmp_path):
    """The blend detector travels in the bundle's metadata: a server loading the bundle runs it (on its
    finishing threads) and answers the flags ONNX Runtime gives here, pairs flagged as blends."""
    from photoz.model.bundle import load_bundle
    from photoz.model.features import sky_background
    from photoz.model.network.export import write_metadata
    from photoz.model.quality import QualityFlagger
    from photoz.service.live import LiveServer
    from photoz.training.release.flags import reference_quality
    from photoz.training.simulation.companions import add_companions

    images, ebv = disk_galaxies(np.random.default_rng(41), 800, r_mag=(15.0, 17.0))
    with h5py.File(tmp_path / "train.h5", "w") as h5:
        h5["images"], h5["ebv"], h5["z"] = images, ebv, np.full(800, 0.1)
    document = {**load_bundle(tiny_bundle).metadata.document, "quality": reference_quality(tmp_path / "train.h5")}
    bundle = write_metadata(tiny_bundle, document, tmp_path / "blend.onnx").path
    new, new_ebv = disk_galaxies(np.random.default_rng(42), 24, r_mag=(15.0, 17.0))
    r_mag = cutout_features(new, new_ebv, BANDS, PIXEL_SCALE_ARCSEC)["r_mag"]
    pairs, _ = add_companions(new, r_mag, sky_background(new, PIXEL_SCALE_ARCSEC)[0], np.random.default_rng(43))
    probe, probe_ebv = np.concatenate([new, pairs]), np.concatenate([new_ebv, new_ebv])
    flagger = QualityFlagger(BANDS, PIXEL_SCALE_ARCSEC, document["quality"])
    offline = flagger.image_bits(probe, probe_ebv)
    assert flagger.blend_net is not None
    assert np.mean(offline[24:] & FLAG_BITS["blend"] > 0) >= 0.6 > np.mean(offline[:24] & FLAG_BITS["blend"] > 0)
    srv = LiveServer(bundle, tmp_path / "blend.log", max_batch_size=8)
    try:
        response = httpx.post(srv.url + "/v1/predict", content=npy_bytes(probe), timeout=60,
                              params={"ebv": ",".join(str(float(e)) for e in probe_ebv)},
                              headers={"Content-Type": "application/x-npy", "Accept": "application/fits"})
        listing = httpx.get(srv.url + "/v1/models")
    finally:
        srv.stop()
    shown = listing.json()["models"][0]["metadata"]["quality"]["blend_net"]  # the graph as its size and digest
    assert "onnx_base64" not in shown and shown["onnx_bytes"] > 1000 and len(shown["onnx_sha256"]) == 64
    assert len(listing.content) < 100_000
    with fits.open(io.BytesIO(response.content)) as hdul:
        served = np.asarray(hdul["PHOTOZ"].data["FLAG_BITS"])
    edge = FLAG_BITS["pdf_at_grid_edge"]
    np.testing.assert_array_equal(served & ~edge, offline)


def test_the_batcher_path_leaves_the_cutout_flags_to_the_server(flagged_bundle, probes):
    """The server runs the network through predict_with_estimates(image_flags=False) and measures the cutouts'
    flags beside it (image_flag_bits): together they are the offline flags, and the first holds only the PDF's."""
    from photoz.model.bundle import load_bundle
    from photoz.model.runtime import OnnxPredictor

    images, ebv, want = probes
    predictor = OnnxPredictor(load_bundle(flagged_bundle), providers="cpu")
    full = predictor.predict_with_estimates(images, ebv)["flag_bits"]
    network = predictor.predict_with_estimates(images, ebv, image_flags=False)["flag_bits"]
    measured = predictor.image_flag_bits(images, ebv)
    np.testing.assert_array_equal(network | measured, full)
    assert not np.any(network & ~np.uint32(FLAG_BITS["pdf_at_grid_edge"]))
    assert measured[1] & FLAG_BITS["masked_pixels"] and measured[2] & FLAG_BITS["point_source"]


def test_the_saturation_floor_ignores_cutouts_the_simulator_saturated(tmp_path):
    """A simulated training set holds bright stars and neighbours the simulator saturated (its catalogue's
    flags say so): their flat tops must not become the saturation flag's floor, or injected saturation of that
    size goes unflagged (6% caught, was the measured regression on simulator 1.6.0 data)."""
    from photoz.training.release.flags import reference_quality
    from photoz.training.simulation.instrument import FLAG_SATURATED

    images, ebv = disk_galaxies(np.random.default_rng(51), 300, r_mag=(15.0, 17.0))
    images[:3, 2, 26:32, 26:33] = images[:3, 2].max() * 2  # a 42-pixel flat top in r
    flags = np.zeros(300, np.int64)
    flags[:3] = FLAG_SATURATED
    for name, attrs in (("plain.h5", {}), ("sim.h5", {"simulator_version": "1.6.0"})):
        with h5py.File(tmp_path / name, "w") as h5:
            h5["images"], h5["ebv"], h5["z"] = images, ebv, np.full(300, 0.1)
            h5["catalogue/flags"] = flags
            h5.attrs.update(attrs)
    user_data = reference_quality(tmp_path / "plain.h5")  # not the simulator's flags: nothing is excluded
    simulated = reference_quality(tmp_path / "sim.h5")
    assert user_data["thresholds"]["plateau_pixels_max"] >= 42
    assert simulated["thresholds"]["plateau_pixels_max"] < 10
    assert simulated["reference"]["saturated_rows_excluded_from_plateau"] == 3
