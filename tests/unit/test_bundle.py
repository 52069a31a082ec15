import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from photoz.model.bundle import METADATA_KEY, BundleError, load_bundle, parse_metadata
from photoz.model.network.export import check_parity, export_bundle, make_metadata, untrained_record


def test_metadata_round_trip(tiny_bundle, tiny_net):
    bundle = load_bundle(tiny_bundle)
    md = bundle.metadata
    assert md.name == "photoz-test-tiny" and md.version == "0.0.1"
    assert md.bands == ("u", "g", "r", "i", "z")
    assert md.cutout_size == 64
    assert md.bins.n_bins == 180 and md.bins.edges[-1] == pytest.approx(0.4)
    doc = md.document
    assert doc["architecture"]["name"] == "pasquet2019_tiny"
    assert doc["architecture"]["config"] == tiny_net.config.to_dict()
    assert doc["pixel_scale_arcsec"] == 0.396 and doc["flux_unit"] == "nanomaggy"
    assert doc["training"]["epochs"] == 0 and "code_commit" in doc["training"]
    assert len(bundle.sha256) == 64


def test_onnx_matches_torch_within_tolerance(tiny_bundle, tiny_net):
    assert check_parity(tiny_net, tiny_bundle, n=8, seed=3) < 1e-5


def test_dynamic_batch_axis(tiny_bundle, tiny_net):
    session = ort.InferenceSession(str(tiny_bundle), providers=["CPUExecutionProvider"])
    for n in (1, 3, 17):
        images = np.random.default_rng(n).normal(0, 1, (n, 5, 64, 64)).astype(np.float32)
        ebv = np.full((n, 1), 0.03, np.float32)
        out = session.run(["probabilities"], {"images": images, "ebv": ebv})[0]
        with torch.no_grad():
            ref = tiny_net(torch.from_numpy(images), torch.from_numpy(ebv)).numpy()
        assert out.shape == (n, 180)
        assert np.max(np.abs(out - ref)) < 1e-5


def write_with_metadata(src, dst, value):
    proto = onnx.load(str(src))
    del proto.metadata_props[:]
    if value is not None:
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, value
    onnx.save(proto, str(dst))


def test_bundle_without_metadata_is_refused(tiny_bundle, tmp_path):
    write_with_metadata(tiny_bundle, tmp_path / "bare.onnx", None)
    with pytest.raises(BundleError, match="no 'photoz' entry"):
        load_bundle(tmp_path / "bare.onnx")


def test_bundle_with_broken_metadata_names_every_problem(tiny_bundle, tmp_path):
    doc = dict(load_bundle(tiny_bundle).metadata.document)
    del doc["bands"]
    doc["training"] = {"seed": 1}
    doc["cutout_size_pixels"] = "64"
    write_with_metadata(tiny_bundle, tmp_path / "bad.onnx", json.dumps(doc))
    with pytest.raises(BundleError) as err:
        load_bundle(tmp_path / "bad.onnx")
    msg = str(err.value)
    assert "missing field 'bands'" in msg
    assert "missing field 'training.dataset'" in msg and "missing field 'training.epochs'" in msg
    assert "field 'cutout_size_pixels' must be an integer, got str" in msg


def test_metadata_that_disagrees_with_the_graph_is_refused(tiny_bundle, tmp_path):
    doc = dict(load_bundle(tiny_bundle).metadata.document)
    doc["redshift_bins"] = {"z_min": 0, "z_max": 0.4, "n_bins": 100}
    doc["inputs"] = {"images": "cutouts", "ebv": "ebv"}
    write_with_metadata(tiny_bundle, tmp_path / "mismatch.onnx", json.dumps(doc))
    with pytest.raises(BundleError, match="graph outputs 180 bins, metadata declares 100") as err:
        load_bundle(tmp_path / "mismatch.onnx")
    assert "no input 'cutouts'" in str(err.value)
    # a declared output the graph lacks is named, and the bins are still checked beside it
    doc["outputs"] = {**doc["outputs"], "epistemic_std": "z_epistemic_std"}
    write_with_metadata(tiny_bundle, tmp_path / "no-spread.onnx", json.dumps(doc))
    with pytest.raises(BundleError, match="graph has no output 'z_epistemic_std'") as err:
        load_bundle(tmp_path / "no-spread.onnx")
    assert "graph outputs 180 bins, metadata declares 100" in str(err.value)
    doc["outputs"] = {"probabilities": "pdf"}
    write_with_metadata(tiny_bundle, tmp_path / "no-pdf.onnx", json.dumps(doc))
    with pytest.raises(BundleError, match="graph has no output 'pdf'"):  # a clear error, not a KeyError
        load_bundle(tmp_path / "no-pdf.onnx")


def test_not_json_and_not_onnx(tiny_bundle, tmp_path):
    write_with_metadata(tiny_bundle, tmp_path / "nj.onnx", "{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tmp_path / "nj.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"hello")
    with pytest.raises(BundleError, match="not a readable ONNX model"):
        load_bundle(tmp_path / "junk.onnx")
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "missing.onnx")


def test_parse_metadata_rejects_wrong_format_version(tiny_bundle):
    doc = dict(load_bundle(tiny_bundle).metadata.document, format_version=99)
    with pytest.raises(BundleError, match="unsupported format_version 99"):
        parse_metadata(doc)


def test_custom_bins_are_exported(tmp_path):
    from photoz.model.network.pasquet import build
    from photoz.model.pdf import RedshiftBins

    net = build("pasquet2019_tiny", n_bins=4).eval()
    bins = RedshiftBins(np.array([0.0, 0.05, 0.1, 0.2, 0.6]))
    md = make_metadata(net, "pasquet2019_tiny", "custom", "1", untrained_record(), bins=bins)
    bundle = export_bundle(net, tmp_path / "c.onnx", md)
    assert np.allclose(bundle.metadata.bins.edges, bins.edges)


def test_serving_and_bundle_loader_never_import_torch(tiny_bundle):
    code = (
        "import sys, photoz.cli, photoz.service.app, photoz.service.client, photoz.pipeline.predict,"
        " photoz.pipeline.cutouts, photoz.formats.inputs, photoz.formats.results, photoz.model.bundle\n"
        "photoz.cli.build_parser()\n"
        f"photoz.model.bundle.load_bundle({str(tiny_bundle)!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('clean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "clean"


def test_fp16_bundle_keeps_float32_io_and_stays_close(tiny_net, tmp_path):
    from photoz.model.runtime import OnnxPredictor

    md = make_metadata(tiny_net, "pasquet2019_tiny", "tiny-fp16", "1", untrained_record())
    bundle = export_bundle(tiny_net, tmp_path / "h.onnx", md, fp16=True)
    assert bundle.metadata.document["precision"] == "float16"
    proto = onnx.load(str(tmp_path / "h.onnx"))
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in proto.graph.initializer)
    images = np.random.default_rng(1).normal(0, 1, (3, 5, 64, 64)).astype(np.float32)
    probs = OnnxPredictor(bundle, providers="cpu").predict(images, np.zeros(3, np.float32))
    assert probs.dtype == np.float32
    with torch.no_grad():
        ref = tiny_net(torch.from_numpy(images), torch.zeros(3, 1)).numpy()
    assert np.max(np.abs(probs - ref)) < 2e-3


def _pit_bundle(tiny_net, path):
    from photoz.model.pdf import RedshiftBins
    from photoz.model.recalibration import PITMap, default_knots

    bins = RedshiftBins.uniform()
    knots = default_knots(bins)
    u = np.linspace(0, 1, 21)
    pit_map = PITMap(knots, np.tile(u ** 1.3, (knots.size, 1)))  # a real (non-identity) map: a gather per object
    metadata = make_metadata(tiny_net, "pasquet2019_tiny", "photoz-test-pit", "0.0.1", untrained_record())
    return export_bundle(tiny_net, path, metadata, pit_map=pit_map)


@pytest.mark.parametrize("value", [np.nan, np.inf, 1e30, -3.4e38])
def test_an_exported_pit_graph_does_not_fail_a_batch_on_a_non_finite_pdf(tiny_net, tmp_path, monkeypatch, value):
    """The PIT map's index cast is guarded: a cutout whose PDF is not finite comes out NaN and its batch's other
    rows are what they are alone; without the guard, ONNX Runtime fails the whole batch."""
    from photoz.model.network.export import GUARD_PREFIX, guard_index_casts

    bundle = _pit_bundle(tiny_net, tmp_path / "pit.onnx")
    proto = onnx.load(str(bundle.path))
    assert any(node.name == "" and node.output[0].startswith(GUARD_PREFIX) for node in proto.graph.node)
    assert guard_index_casts(proto) == 0  # idempotent: already guarded
    images = np.random.default_rng(0).normal(0, 0.05, (3, 5, 64, 64)).astype(np.float32)
    images[1, 2, 30, 30] = value
    ebv = np.zeros((3, 1), np.float32)
    session = ort.InferenceSession(str(bundle.path), providers=["CPUExecutionProvider"])
    probs = session.run(["probabilities"], {"images": images, "ebv": ebv})[0]
    assert np.isnan(probs[1]).all()
    alone = session.run(["probabilities"], {"images": images[[0, 2]], "ebv": ebv[[0, 2]]})[0]
    np.testing.assert_allclose(probs[[0, 2]], alone, atol=1e-7)

    monkeypatch.setattr("photoz.model.network.export.guard_index_casts", lambda proto: 0)
    unguarded = _pit_bundle(tiny_net, tmp_path / "unguarded.onnx")
    with pytest.raises(Exception, match="GatherElements"):
        ort.InferenceSession(str(unguarded.path), providers=["CPUExecutionProvider"]).run(
            ["probabilities"], {"images": images, "ebv": ebv})


def test_guard_graph_revises_an_exported_bundle_keeping_its_outputs(tiny_net, tmp_path, monkeypatch):
    """photoz guard-graph on a bundle exported before the guard: same PDFs, a new version, the revision recorded
    in its training record and on its model card."""
    from photoz.cli import main
    from photoz.training.release.model_card import render

    monkeypatch.setattr("photoz.model.network.export.guard_index_casts", lambda proto: 0)
    old = _pit_bundle(tiny_net, tmp_path / "old.onnx")
    monkeypatch.undo()
    assert main(["guard-graph", "--model", str(old.path), "--out", str(tmp_path / "new.onnx"),
                 "--version", "0.0.2"]) == 0
    new = load_bundle(tmp_path / "new.onnx")
    assert new.metadata.version == "0.0.2" and new.sha256 != old.sha256
    [revision] = new.metadata.document["training"]["revisions"]
    assert revision["version"] == "0.0.2" and "1 float-to-integer index cast(s) guarded" in revision["change"]
    images = np.random.default_rng(1).normal(0, 0.05, (4, 5, 64, 64)).astype(np.float32)
    ebv = np.full((4, 1), 0.02, np.float32)
    run = [ort.InferenceSession(str(b.path), providers=["CPUExecutionProvider"]).run(
        ["probabilities"], {"images": images, "ebv": ebv})[0] for b in (old, new)]
    np.testing.assert_array_equal(run[0], run[1])
    report = {"data": "x.h5", "n": 4, "model_metrics": {"point_estimate": "z_mean", "sigma_mad": 0.1,
              "outlier_fraction": 0.5, "bias": 0.0, "crps": 0.1, "pit_ks": 0.5, "n": 4, "by_redshift": []}}
    assert "- revision 0.0.2 (code commit `" in render(new.path, report, [])


def test_record_prior_stores_the_training_nz_and_keeps_the_graph(tiny_bundle, tmp_path):
    """photoz record-prior: the training set's true redshifts counted on the bundle's bins, stored under
    training.n_z with a revision; the graph (and so every PDF) unchanged."""
    import h5py

    from photoz.cli import main
    from photoz.model.priors import regularised, training_nz

    z = np.random.default_rng(3).gamma(4.0, 0.03, 500)
    with h5py.File(tmp_path / "train.h5", "w") as h5:
        h5["z"] = z
    old = load_bundle(tiny_bundle)
    assert training_nz(old.metadata.document, old.metadata.bins) is None
    assert main(["record-prior", "--model", str(tiny_bundle), "--data", str(tmp_path / "train.h5"), "--n", "400",
                 "--out", str(tmp_path / "new.onnx"), "--version", "0.0.9"]) == 0
    new = load_bundle(tmp_path / "new.onnx")
    record = new.metadata.document["training"]["n_z"]
    counts = np.histogram(z[:400], new.metadata.bins.edges)[0]
    assert record["counts"] == counts.tolist() and record["n_objects"] == 400
    assert record["outside_grid"] == int((z[:400] >= 0.4).sum()) and "first 400 rows" in record["source"]
    np.testing.assert_allclose(training_nz(new.metadata.document, new.metadata.bins), regularised(counts))
    assert new.metadata.version == "0.0.9" and "n(z) recorded" in new.metadata.document["training"]["revisions"][-1][
        "change"]
    old_graph, new_graph = (onnx.load(str(b.path)).graph for b in (old, new))
    assert old_graph.SerializeToString() == new_graph.SerializeToString()
