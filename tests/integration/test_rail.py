"""photoz as LSST DESC RAIL stages (integrations/rail), with the real pz-rail-base, qp and ceci.

The estimator's PDFs are checked against ``photoz predict``'s on the same file, in this process and through a
live ``photoz serve``; RAIL's evaluator against ``photoz evaluate``'s numbers; the ceci pipeline end to end.
"""
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from astropy.io import fits

photoz_image = pytest.importorskip(
    "rail.estimation.algos.photoz_image",
    reason="the RAIL stages need Python >= 3.11 and `pip install -e ./integrations/rail` (make install-dev)")

from rail.core.data import TableHandle  # noqa: E402

from photoz.model.bundle import load_bundle  # noqa: E402
from photoz.model.pdf import ESTIMATES  # noqa: E402
from photoz.pipeline.jobs import PredictJob  # noqa: E402
from photoz.pipeline.predict import predict_files  # noqa: E402

PhotozImageEstimator, PhotozImageInformer = photoz_image.PhotozImageEstimator, photoz_image.PhotozImageInformer
StageInputError, VALID_ANCIL = photoz_image.StageInputError, photoz_image.VALID_ANCIL
POISONED_ROW, BAD_EBV_ROW = 3, 50


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """A small simulated data set as photoz simulate writes it (images, ebv, z and truth/, catalogue/ groups),
    under the .hdf5 suffix RAIL's readers expect."""
    from photoz.training.simulation.simulate import simulate

    return simulate(tmp_path_factory.mktemp("rail") / "sim.hdf5", 96, seed=5, workers=1, chunk_size=48,
                    progress=False)


@pytest.fixture(scope="module")
def poisoned(simulated, tmp_path_factory):
    """The same cutouts with a 1e30 mask sentinel in one and an impossible E(B-V) in another, plus ids."""
    path = tmp_path_factory.mktemp("rail") / "poisoned.hdf5"
    with h5py.File(simulated, "r") as src, h5py.File(path, "w") as dst:
        images, ebv = src["images"][:], src["ebv"][:]
        images[POISONED_ROW, 2, 30, 30] = 1e30
        ebv[BAD_EBV_ROW] = -1.0
        dst["images"], dst["ebv"], dst["z"] = images, ebv, src["z"][:]
        dst["object_id"] = np.arange(len(ebv)) + 1000
        src.copy("truth", dst)  # a group beside the cutouts, as in photoz's own files
    return path


def _inform(tmp_path, bundle, name):
    informer = PhotozImageInformer.make_stage(name=f"inform_{name}", bundle=str(bundle),
                                              model=str(tmp_path / f"{name}.pkl"))
    return informer.inform()


def _estimate(tmp_path, model, data, name, **config):
    estimator = PhotozImageEstimator.make_stage(name=f"estimate_{name}", model=model, chunk_size=40,
                                                output=str(tmp_path / f"{name}.hdf5"), **config)
    return estimator, estimator.estimate(TableHandle("input", path=str(data))).data


def _predicted(data, bundle, tmp_path):
    """photoz predict's table of the same file."""
    predict_files(PredictJob([data], tmp_path / "predict.fits", model=bundle, chunk_size=32, quiet=True))
    with fits.open(tmp_path / "predict.fits") as hdul:
        return {name: np.array(hdul["PHOTOZ"].data[name]) for name in hdul["PHOTOZ"].columns.names}


def _probabilities(ensemble):
    edges = np.asarray(ensemble.metadata["bins"]).ravel()
    return ensemble.objdata["pdfs"] * np.diff(edges)[None, :], edges


def test_rails_discovery_finds_the_stages():
    import rail.stages

    rail.stages.import_and_attach_all(silent=True)
    assert rail.stages.PhotozImageInformer is PhotozImageInformer
    assert rail.stages.PhotozImageEstimator is PhotozImageEstimator
    assert "PhotozImageEstimator" in rail.stages.__all__


def test_the_informed_model_describes_the_bundle(tiny_bundle, tmp_path):
    model = _inform(tmp_path, tiny_bundle, "describe").data
    bundle = load_bundle(tiny_bundle)
    assert model["sha256"] == bundle.sha256 and model["name"] == bundle.metadata.name
    assert model["bands"] == list("ugriz") and model["cutout_size_pixels"] == 64
    np.testing.assert_array_equal(model["bin_edges"], bundle.metadata.bins.edges)
    assert (tmp_path / "describe.pkl").exists()


def test_estimates_equal_photoz_predicts_and_refused_cutouts_keep_their_row(poisoned, tiny_bundle, tmp_path):
    stage, ensemble = _estimate(tmp_path, _inform(tmp_path, tiny_bundle, "local"), poisoned, "local")
    table = _predicted(poisoned, tiny_bundle, tmp_path)
    n = len(table["PDF"])
    assert ensemble.npdf == n  # every input row, in order, over three chunks of 40
    probs, edges = _probabilities(ensemble)
    np.testing.assert_array_equal(edges, load_bundle(tiny_bundle).metadata.bins.edges)
    valid = ensemble.ancil[VALID_ANCIL].astype(bool)
    assert valid.tolist() == table["VALID"].tolist()
    assert not valid[POISONED_ROW] and not valid[BAD_EBV_ROW] and valid.sum() == n - 2
    np.testing.assert_allclose(probs[valid], table["PDF"][valid], atol=1e-6)
    for key in ESTIMATES:
        np.testing.assert_allclose(ensemble.ancil[key][valid], table[key.upper()][valid], atol=1e-6, rtol=1e-6)
    assert np.array_equal(ensemble.ancil["flags"][valid], table["FLAG_BITS"][valid])
    # a refused cutout: a flat PDF, marked invalid, counted by the stage
    np.testing.assert_allclose(probs[POISONED_ROW], 1 / probs.shape[1])
    assert stage.refused == 2
    assert ensemble.ancil["id"].ravel().tolist() == list(range(1000, 1000 + n))  # RAIL's id_col travels along


def test_estimates_through_a_live_service_equal_those_made_here(poisoned, tiny_bundle, server, tmp_path):
    model = _inform(tmp_path, tiny_bundle, "remote")
    _, here = _estimate(tmp_path, model, poisoned, "here")
    _, served = _estimate(tmp_path, model, poisoned, "served", url=server.url)
    valid = here.ancil[VALID_ANCIL].astype(bool)
    assert served.ancil[VALID_ANCIL].astype(bool).tolist() == valid.tolist()
    np.testing.assert_allclose(_probabilities(served)[0][valid], _probabilities(here)[0][valid], atol=1e-6)
    np.testing.assert_allclose(served.ancil["z_median"][valid], here.ancil["z_median"][valid], atol=1e-6)


def test_a_service_serving_another_bundle_is_refused(poisoned, server, tmp_path):
    shipped = Path(__file__).resolve().parents[2] / "model" / "bundles" / "photoz-sdss-sim.onnx"
    model = _inform(tmp_path, shipped, "other")
    with pytest.raises(StageInputError, match="not the informed photoz-sdss-sim"):
        _estimate(tmp_path, model, poisoned, "other", url=server.url)


def test_rails_evaluation_agrees_with_photoz_evaluate(simulated, tiny_bundle, tmp_path):
    """RAIL's point metrics (qp.metrics via PointToPointEvaluator) and qp's PIT on the estimator's ensemble
    against photoz evaluate's scoring of photoz's own predictions of the same file."""
    from qp.metrics.pit import PIT
    from rail.evaluation.point_to_point_evaluator import PointToPointEvaluator
    from rail.photoz.pipeline import POINT_METRICS, write_truth

    from photoz.training.evaluation.evaluate import predict_file, score

    handle = PhotozImageEstimator.make_stage(name="estimate_eval", model=_inform(tmp_path, tiny_bundle, "eval"),
                                             chunk_size=40, output=str(tmp_path / "eval.hdf5"))
    ensemble = handle.estimate(TableHandle("input", path=str(simulated))).data
    truth = write_truth(simulated, tmp_path / "truth.hdf5")
    evaluator = PointToPointEvaluator.make_stage(
        name="evaluate_points", metrics=list(POINT_METRICS), point_estimate_key="z_mean",
        reference_dictionary_key="redshift", hdf5_groupname="photometry", force_exact=True,
        output=str(tmp_path / "ev.hdf5"), summary=str(tmp_path / "ev_summary.hdf5"))
    summary = evaluator.evaluate(handle.get_handle("output"), TableHandle("truth", path=str(truth)))["summary"].data
    with h5py.File(simulated, "r") as h5:
        z = h5["z"][:]
    pdfs, bins = predict_file(tiny_bundle, simulated)
    photoz = score(pdfs, bins, z)
    for rail_name, photoz_name in POINT_METRICS.items():
        assert float(np.ravel(summary[rail_name])[0]) == pytest.approx(photoz[photoz_name], abs=1e-6), rail_name
    assert PIT(ensemble, z).evaluate_PIT_KS().statistic == pytest.approx(photoz["pit_ks"], abs=1e-6)


def test_bad_input_names_the_stage_and_the_field(simulated, tiny_bundle, tmp_path):
    not_a_bundle = tmp_path / "notes.onnx"
    not_a_bundle.write_text("not a model")
    with pytest.raises(StageInputError, match=r"PhotozImageInformer: bundle: expected a photoz bundle"):
        _inform(tmp_path, not_a_bundle, "bad")
    model = _inform(tmp_path, tiny_bundle, "good")
    no_images = tmp_path / "no_images.hdf5"
    with h5py.File(no_images, "w") as h5:
        h5["z"] = np.zeros(3)
    with pytest.raises(StageInputError, match=r"PhotozImageEstimator: input\[.*\]: expected a dataset 'images'"):
        _estimate(tmp_path, model, no_images, "no_images")
    three_bands = tmp_path / "three_bands.hdf5"
    with h5py.File(three_bands, "w") as h5:
        h5["images"] = np.zeros((4, 3, 64, 64), np.float32)
    with pytest.raises(StageInputError, match=r"PhotozImageEstimator: input\[/\]\[images\]: expected .*5 bands"):
        _estimate(tmp_path, model, three_bands, "three_bands")
    with pytest.raises(StageInputError, match=r"hdf5_groupname: expected a group"):
        _estimate(tmp_path, model, simulated, "no_group", hdf5_groupname="photometry")


def test_the_ceci_pipeline_runs_end_to_end(simulated, tiny_bundle, tmp_path):
    """inform -> estimate -> RAIL's evaluators under ceci, each stage its own process, as DESC runs them."""
    from photoz.training.evaluation.evaluate import predict_file, score

    run = subprocess.run([sys.executable, "-m", "rail.photoz.pipeline", "--cutouts", str(simulated),
                          "--bundle", str(tiny_bundle), "--out-dir", str(tmp_path / "run"), "--chunk-size", "40",
                          "--providers", "cpu"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Pipeline successful" in run.stdout
    printed = dict(line.split() for line in run.stdout.splitlines()[-5:])
    with h5py.File(simulated, "r") as h5:
        z = h5["z"][:]
    photoz = score(*predict_file(tiny_bundle, simulated), z)
    for name, value in printed.items():
        assert float(value) == pytest.approx(photoz[name], abs=2e-6), name
    assert (tmp_path / "run" / "photoz_image.yml").exists()


def test_the_committed_pipeline_yaml_is_the_one_the_script_writes(tmp_path):
    """integrations/rail/pipeline/photoz_image.yml: the same stages, classes and wiring as write_pipeline's."""
    import yaml
    from rail.photoz.pipeline import write_pipeline

    committed = Path(__file__).resolve().parents[2] / "integrations" / "rail" / "pipeline"
    fresh = write_pipeline(tmp_path / "photoz_image.yml", "sim.hdf5", "truth.hdf5",
                           "../../../model/bundles/photoz-sdss-sim.onnx", "outputs")
    ours, theirs = (yaml.safe_load(p.read_text()) for p in (committed / "photoz_image.yml", fresh))
    assert ours["stages"] == theirs["stages"] and ours["inputs"] == theirs["inputs"]
    config = yaml.safe_load((committed / "photoz_image_config.yml").read_text())
    assert config["estimate_photoz"]["images_col"] == "images"
    assert (committed.parents[2] / "model" / "bundles" / "photoz-sdss-sim.onnx").exists()
    assert Path(config["inform_photoz"]["bundle"]).name == "photoz-sdss-sim.onnx"


def test_mpi_ranks_read_disjoint_chunks_that_cover_the_file(poisoned, tiny_bundle, tmp_path):
    """Under MPI each rank reads its own chunks (RAIL's split); here the ranks are set by hand (no MPI)."""
    model = _inform(tmp_path, tiny_bundle, "ranks")
    seen = []
    for rank in range(3):
        stage = PhotozImageEstimator.make_stage(name=f"estimate_rank{rank}", model=model, chunk_size=16)
        stage._rank, stage._size = rank, 3
        stage.set_data("input", TableHandle("input", path=str(poisoned)), do_read=False)
        for start, end, data in stage.input_iterator("input"):
            assert len(data["images"]) == end - start and set(data) == {"images", "ebv", "object_id"}
            np.testing.assert_array_equal(data["object_id"], np.arange(start, end) + 1000)
            seen.append((rank, start, end))
    starts = sorted(s for _, s, _ in seen)
    assert starts == list(range(0, 96, 16)) and len({r for r, _, _ in seen}) == 3
