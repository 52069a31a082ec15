"""Training end to end on a tiny simulated set: simulate -> train -> resume -> export -> load -> predict."""
import csv
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from photoz.model.bundle import load_bundle
from photoz.model.runtime import OnnxPredictor
from photoz.pipeline.jobs import PredictJob
from photoz.training.fit.checkpoints import load_checkpoint
from photoz.training.fit.data import CutoutDataset, DataFormatError, inspect, split_indices
from photoz.training.fit.train import InMemoryData, TrainConfig, augment_batch, epoch_batches, train
from photoz.training.release.jobs import ExportJob

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from photoz.training.simulation.simulate import simulate

    return simulate(tmp_path_factory.mktemp("data") / "tiny.h5", 160, seed=21, workers=2, chunk_size=32,
                    progress=False)


def tiny_config(data, out, **kw):
    settings = dict(variant="pasquet2019_tiny", epochs=2, batch_size=16, workers=0, max_steps_per_epoch=3,
                    validation_fraction=0.2)
    return TrainConfig(data=str(data), out_dir=str(out), **{**settings, **kw})


def test_end_to_end_train_resume_export_predict(tiny_data, tmp_path):
    run = train(tiny_config(tiny_data, tmp_path / "run"), progress=False)
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[1]["lr"]) == pytest.approx(1e-4 / 5)  # divided by 5 halfway
    for key in ("val_sigma_mad", "val_outlier_fraction", "val_bias", "val_crps", "val_pit_ks"):
        assert np.isfinite(float(rows[0][key]))
    assert (run / "best.pt").exists()
    before = torch.load(run / "last.pt", weights_only=False)

    # resume continues from the checkpoint: epoch 3 only, weights moved on from epoch 2's
    train(tiny_config(tiny_data, tmp_path / "run", epochs=3), resume=True, progress=False)
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    after = torch.load(run / "last.pt", weights_only=False)
    assert after["epoch"] == 3 and before["epoch"] == 2
    assert not torch.equal(after["model"]["classifier.4.weight"], before["model"]["classifier.4.weight"])
    # best.pt is the epoch of the lowest validation CRPS (not of the lowest sigma_MAD)
    best = torch.load(run / "best.pt", weights_only=False)
    lowest = min(rows, key=lambda r: float(r["val_crps"]))
    assert best["epoch"] == int(lowest["epoch"])
    assert best["best"]["val_crps"] == pytest.approx(float(lowest["val_crps"]))

    # export with the training record, load without torch's help, predict
    from photoz.training.evaluation.evaluate import evaluate
    from photoz.training.release.export import export_checkpoint

    report = evaluate(run / "best.pt", tiny_data, tmp_path / "eval", baseline_train=tiny_data, figures=True)
    assert (tmp_path / "eval" / "photoz_diagnostics.png").stat().st_size > 10_000
    assert report["baseline"]["metrics"]["n"] == 160
    # the strong baselines: the simulated catalogue's model magnitudes, dereddened with its E(B-V)
    features = [b["name"].split(" on ")[1] for b in report["strong_baselines"]]
    assert features == ["dereddened model r + 4 colours"] * 2
    assert [b["method"] for b in report["strong_baselines"]] == ["KNNPhotoZ", "LocalLinearPhotoZ"]
    # simulated files carry the truth: the same kNN on noise-free magnitudes, the colours' ceiling
    ceiling = report["noise_free_ceiling"]
    assert ceiling["name"].startswith("kNN (k=16) on noise-free dereddened") and ceiling["metrics"]["n"] == 160
    assert ceiling["metrics"]["sigma_mad"] != report["strong_baselines"][0]["metrics"]["sigma_mad"]
    bundle = export_checkpoint(ExportJob(run / "best.pt", tmp_path / "b.onnx", "tiny-e2e", "0.0.1",
                                         tmp_path / "eval" / "metrics.json"))
    record = load_bundle(bundle.path).metadata.document["training"]
    assert record["dataset"]["name"] == "tiny.h5" and record["dataset"]["n_objects"] == 160
    assert record["seed"] == 0 and record["epochs"] >= 1
    assert "held_out" in record["metrics"] and "baseline" in record["metrics"]
    with h5py.File(tiny_data) as h5:  # the training set's n(z), the prior its PDFs carry
        assert record["n_z"]["counts"] == np.histogram(h5["z"][:], bundle.metadata.bins.edges)[0].tolist()
    assert record["n_z"]["n_objects"] == 160
    net, _ = load_checkpoint(run / "best.pt")
    with h5py.File(tiny_data) as h5:
        images, ebv = h5["images"][:5], h5["ebv"][:5]
    onnx_p = OnnxPredictor(bundle, providers="cpu").predict(images, ebv)
    with torch.no_grad():
        torch_p = net(torch.from_numpy(images), torch.from_numpy(ebv).reshape(-1, 1)).numpy()
    np.testing.assert_allclose(onnx_p, torch_p, atol=1e-5)


def test_mc_dropout_trains_and_exports_as_one_deterministic_graph(tiny_data, tmp_path):
    """photoz train --dropout, then photoz export --mc-passes: ONNX Runtime gives torch's MC-dropout PDF (the
    mean of the passes), the same twice, unlike the plain network; the record and the card say so."""
    from photoz.model.network.pasquet import MCDropoutNet
    from photoz.training.release.export import export_checkpoint
    from photoz.training.release.model_card import render

    run = train(tiny_config(tiny_data, tmp_path / "drop", dropout=0.25, epochs=1), progress=False)
    net, state = load_checkpoint(run / "best.pt")
    assert state["network_config"]["dropout"] == 0.25 and not net.training
    bundle = export_checkpoint(ExportJob(run / "best.pt", tmp_path / "mc.onnx", "tiny-mc", "0.0.1", mc_passes=6,
                                         mc_seed=3))
    record = load_bundle(bundle.path).metadata.document["training"]
    assert record["mc_dropout"] == {"passes": 6, "rate": 0.25, "seed": 3,
                                    "combination": "mean of the passes' PDFs; masks fixed at export (deterministic)"}
    with h5py.File(tiny_data) as h5:
        images, ebv = h5["images"][:6], h5["ebv"][:6]
    predictor = OnnxPredictor(bundle, providers="cpu")
    onnx_p = predictor.predict(images, ebv)
    np.testing.assert_array_equal(onnx_p, predictor.predict(images, ebv))
    with torch.no_grad():
        x, e = torch.from_numpy(images), torch.from_numpy(ebv).reshape(-1, 1)
        mc_p, plain_p = MCDropoutNet(net, 6, seed=3)(x, e).numpy(), net(x, e).numpy()
    np.testing.assert_allclose(onnx_p, mc_p, atol=1e-5)
    assert np.abs(onnx_p - plain_p).max() > 1e-4
    with torch.no_grad():  # the passes' spread of mean redshift, a column of every output
        bins = load_bundle(bundle.path).metadata.bins
        spread = (MCDropoutNet(net, 6, seed=3).member_probs(x, e).numpy() @ bins.centres).std(axis=0)
    np.testing.assert_allclose(predictor.predict_with_estimates(images, ebv)["z_epistemic_std"], spread, atol=1e-5)
    single = OnnxPredictor(export_checkpoint(ExportJob(run / "best.pt", tmp_path / "one.onnx", "tiny", "0.0.1")),
                           providers="cpu").predict_with_estimates(images, ebv)
    assert np.isnan(single["z_epistemic_std"]).all() and np.isfinite(single["z_mean"]).all()
    report = {"data": "tiny.h5", "n": 6, "model_metrics": {"point_estimate": "z_mean", "sigma_mad": 0.1,
              "outlier_fraction": 0.5, "bias": 0.0, "crps": 0.1, "pit_ks": 0.5, "n": 6, "by_redshift": []}}
    assert "MC dropout: 6 passes through the dense head at dropout rate 0.25" in render(bundle.path, report, [])
    with pytest.raises(ValueError, match="trained with dropout"):
        plain = train(tiny_config(tiny_data, tmp_path / "plain", epochs=1, max_steps_per_epoch=1), progress=False)
        export_checkpoint(ExportJob(plain / "best.pt", tmp_path / "x.onnx", "x", "0.0.1", mc_passes=4))


def test_deep_ensemble_exports_as_one_graph_averaging_its_members(tiny_data, tmp_path):
    """Two networks from different seeds exported as one bundle: ONNX Runtime gives the mean of the members'
    torch PDFs, the training record names the members, and members of another architecture are refused."""
    from photoz.training.release.export import export_checkpoint
    from photoz.training.release.model_card import render

    runs = [train(tiny_config(tiny_data, tmp_path / f"m{seed}", seed=seed, epochs=1), progress=False)
            for seed in (0, 1)]
    bundle = export_checkpoint(ExportJob([r / "best.pt" for r in runs], tmp_path / "ens.onnx", "tiny-ensemble",
                                         "0.0.1"))
    record = load_bundle(bundle.path).metadata.document["training"]
    assert record["ensemble"]["members"] == 2 and record["seed"] == [0, 1]
    assert len(record["metrics"]["validation"]["members"]) == 2
    with h5py.File(tiny_data) as h5:
        images, ebv = h5["images"][:6], h5["ebv"][:6]
    members = []
    for r in runs:
        net, _ = load_checkpoint(r / "best.pt")
        with torch.no_grad():
            members.append(net(torch.from_numpy(images), torch.from_numpy(ebv).reshape(-1, 1)).numpy())
    assert np.abs(members[0] - members[1]).max() > 1e-3  # different seeds: different networks
    onnx_p = OnnxPredictor(bundle, providers="cpu").predict(images, ebv)
    np.testing.assert_allclose(onnx_p, (members[0] + members[1]) / 2, atol=1e-5)
    # the members' disagreement comes out as z_epistemic_std: half the difference of their mean redshifts
    bins = load_bundle(bundle.path).metadata.bins
    out = OnnxPredictor(bundle, providers="cpu").predict_with_estimates(images, ebv)
    means = np.stack(members) @ bins.centres
    np.testing.assert_allclose(out["z_epistemic_std"], np.abs(means[0] - means[1]) / 2, atol=1e-5)
    assert load_bundle(bundle.path).metadata.output_epistemic == "z_epistemic_std"
    from astropy.table import Table

    from photoz.pipeline.predict import predict_files  # offline, into a FITS table: a column like the others

    np.save(tmp_path / "cutouts.npy", images)
    predict_files(PredictJob([tmp_path / "cutouts.npy"], tmp_path / "ens.fits", model=bundle.path, quiet=True))
    np.testing.assert_allclose(Table.read(tmp_path / "ens.fits")["Z_EPISTEMIC_STD"],
                               OnnxPredictor(bundle, providers="cpu").predict_with_estimates(
                                   images, np.zeros(len(images)))["z_epistemic_std"], atol=1e-6)
    report = {"data": "tiny.h5", "n": 6, "model_metrics": {"point_estimate": "z_mean", "sigma_mad": 0.1,
              "outlier_fraction": 0.5, "bias": 0.0, "crps": 0.1, "pit_ks": 0.5, "n": 6, "by_redshift": []}}
    assert "deep ensemble of 2 networks (seeds [0, 1])" in render(bundle.path, report, [])
    # a PIT map on an ensemble maps the averaged PDF; the members' spread passes through unchanged
    import json

    from photoz.model.recalibration import PITMap

    u = np.linspace(0, 1, 11)
    pit_map = PITMap(np.array([0.05, 0.15, 0.3]), np.stack([u ** 0.7, u, u ** 1.4]))
    (tmp_path / "map.json").write_text(json.dumps({"map": pit_map.to_metadata()}))
    mapped = export_checkpoint(ExportJob([r / "best.pt" for r in runs], tmp_path / "ens-pit.onnx", "tiny-ensemble",
                                         "0.0.1", thresholds=False, pit_map=tmp_path / "map.json"))
    got = OnnxPredictor(mapped, providers="cpu").predict_with_estimates(images, ebv)
    np.testing.assert_allclose(got["probs"], pit_map.apply((members[0] + members[1]) / 2, bins), atol=1e-5)
    np.testing.assert_allclose(got["z_epistemic_std"], np.abs(means[0] - means[1]) / 2, atol=1e-5)

    other = train(tiny_config(tiny_data, tmp_path / "wide", variant="pasquet2019_half", epochs=1,
                              max_steps_per_epoch=1), progress=False)
    with pytest.raises(ValueError, match="architecture"):
        export_checkpoint(ExportJob([runs[0] / "best.pt", other / "best.pt"], tmp_path / "bad.onnx", "x", "0.0.1"))


def test_recalibrated_temperature_is_fitted_on_validation_rows_and_exported_in_the_graph(tiny_data, tmp_path):
    from photoz.training.release.export import export_checkpoint
    from photoz.training.release.temperature import main as recalibrate_main

    run = train(tiny_config(tiny_data, tmp_path / "t", epochs=1), progress=False)
    assert recalibrate_main(["--checkpoint", str(run / "best.pt"), "--out", str(run / "calibrated.pt")]) == 0
    net, state = load_checkpoint(run / "calibrated.pt")
    report = state["recalibration"]
    assert net.temperature == state["temperature"] != 1.0
    assert report["validation_rows"] == state["dataset"]["n_validation"]
    assert report["after"]["nll"] <= report["before"]["nll"]
    bundle = export_checkpoint(ExportJob(run / "calibrated.pt", tmp_path / "t.onnx", "tiny-t", "0.0.1"))
    assert load_bundle(bundle.path).metadata.document["training"]["temperature"] == net.temperature
    with h5py.File(tiny_data) as h5:
        images, ebv = h5["images"][:5], h5["ebv"][:5]
    with torch.no_grad():
        logits = net.logits(torch.from_numpy(images), torch.from_numpy(ebv).reshape(-1, 1))
        expected = torch.softmax(logits / net.temperature, dim=1).numpy()
    np.testing.assert_allclose(OnnxPredictor(bundle, providers="cpu").predict(images, ebv), expected, atol=1e-5)


def test_sigterm_checkpoint_and_exact_batch_resume(tiny_data, tmp_path):
    """A SIGTERM mid-epoch writes last.pt at the batch reached; resume skips exactly those batches."""
    out = tmp_path / "sig"
    code = (
        "import os, signal, sys\n"
        "import photoz.training.fit.train as t\n"
        "orig = t._Logits.forward\n"
        "calls = {'n': 0}\n"
        "def forward(self, images, ebv):\n"
        "    calls['n'] += 1\n"
        "    if calls['n'] == 2:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return orig(self, images, ebv)\n"
        "t._Logits.forward = forward\n"
        f"t.train(t.TrainConfig(data={str(tiny_data)!r}, out_dir={str(out)!r}, variant='pasquet2019_tiny', epochs=2,"
        " batch_size=16, workers=0, max_steps_per_epoch=5, validation_fraction=0.2), progress=False)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["epoch"] == 0 and state["batch_in_epoch"] == 2
    train(tiny_config(tiny_data, out, max_steps_per_epoch=5), resume=True, progress=False)
    assert torch.load(out / "last.pt", weights_only=False)["epoch"] == 2


def test_preload_trains_in_memory_and_matches_streamed_validation(tiny_data, tmp_path):
    """--preload holds the data set as tensors; validation on it scores exactly like the streamed reader."""
    run = train(tiny_config(tiny_data, tmp_path / "pre", epochs=1, preload=True), progress=False)
    row = next(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    net, state = load_checkpoint(run / "last.pt")
    assert state["train_config"]["preload"] is True and state["epoch"] == 1
    from photoz.model.pdf import RedshiftBins
    from photoz.training.fit.train import validate

    _, val_idx = split_indices(160, 0.2, 0)
    bins = RedshiftBins.uniform()
    in_memory = validate(net, InMemoryData(tiny_data, torch.device("cpu")).subset(val_idx), bins, "cpu", 0)
    streamed = validate(net, CutoutDataset(tiny_data, val_idx), bins, "cpu", 0)
    assert in_memory["n"] == streamed["n"] == 32
    assert in_memory["sigma_mad"] == pytest.approx(streamed["sigma_mad"], rel=1e-6)
    assert float(row["val_crps"]) == pytest.approx(streamed["crps"], rel=1e-4)
    # the augmented batches hold the right objects, rotated or flipped
    data = InMemoryData(tiny_data, torch.device("cpu"))
    (images, ebv, z), = list(data.batches([[3, 7]], seed=(0, 0, 0, 0)))
    with h5py.File(tiny_data) as h5:
        assert np.allclose(z.numpy(), h5["z"][[3, 7]]) and np.allclose(ebv.numpy()[:, 0], h5["ebv"][[3, 7]])
        for got, want in zip(images.numpy(), h5["images"][[3, 7]], strict=True):
            assert np.array_equal(np.sort(got.ravel()), np.sort(want.ravel()))


def test_best_checkpoint_is_chosen_by_crps_not_sigma_mad():
    from photoz.training.fit.checkpoints import is_better

    sharp_but_miscalibrated = {"val_sigma_mad": 0.017, "val_crps": 0.0131}
    calibrated = {"val_sigma_mad": 0.018, "val_crps": 0.0125}
    assert is_better(calibrated, sharp_but_miscalibrated) and not is_better(sharp_but_miscalibrated, calibrated)
    assert is_better(sharp_but_miscalibrated, None)
    assert is_better({"val_sigma_mad": 0.017}, {"val_sigma_mad": 0.018})  # an old record without CRPS


def test_augment_batch_is_the_numpy_rotation_and_flip():
    images = torch.arange(4 * 2 * 3 * 3, dtype=torch.float32).reshape(4, 2, 3, 3)
    rot, flip = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 0, 1, 0])
    out = augment_batch(images, rot, flip).numpy()
    for i in range(4):
        want = np.rot90(images[i].numpy(), k=int(rot[i]), axes=(1, 2))
        want = want[:, :, ::-1] if flip[i] else want
        assert np.array_equal(out[i], want)


def test_epoch_batches_are_deterministic_disjoint_and_sharded():
    idx = np.arange(100, 200)
    a = epoch_batches(idx, 10, seed=1, epoch=0, rank=0, world=2)
    b = epoch_batches(idx, 10, seed=1, epoch=0, rank=1, world=2)
    assert a == epoch_batches(idx, 10, seed=1, epoch=0, rank=0, world=2)
    flat_a, flat_b = sum(a, []), sum(b, [])
    assert not set(flat_a) & set(flat_b) and set(flat_a) | set(flat_b) <= set(idx.tolist())
    assert epoch_batches(idx, 10, seed=1, epoch=1, rank=0, world=2) != a


def test_validation_split_is_by_object_and_fixed():
    train_idx, val_idx = split_indices(1000, 0.1, seed=3)
    assert len(val_idx) == 100 and not set(train_idx) & set(val_idx)
    assert np.array_equal(split_indices(1000, 0.1, seed=3)[1], val_idx)


def test_dataset_reads_channel_last_user_files_and_augments(tmp_path):
    path = tmp_path / "user.h5"
    images = np.random.default_rng(0).normal(size=(4, 64, 64, 5)).astype(np.float32)
    with h5py.File(path, "w") as h5:
        h5["images"], h5["z"] = images, np.array([0.1, 0.2, 0.05, 0.3])
    info = inspect(path)
    assert info["channel_last"] and not info["has_ebv"]
    image, ebv, z = CutoutDataset(path)[1]
    assert image.shape == (5, 64, 64) and np.array_equal(image, np.moveaxis(images[1], -1, 0))
    assert ebv[0] == 0 and z == pytest.approx(0.2)
    aug = CutoutDataset(path, augment=True)
    np.random.seed(0)
    seen = {aug[0][0].tobytes() for _ in range(30)}
    assert len(seen) > 3  # rotations and flips
    for a in seen:
        flat = np.sort(np.frombuffer(a, np.float32))
        assert np.array_equal(flat, np.sort(np.moveaxis(images[0], -1, 0).ravel()))
    with h5py.File(tmp_path / "bad.h5", "w") as h5:
        h5["images"] = np.zeros((2, 3, 64, 64), np.float32)
        h5["z"] = np.zeros(2)
    with pytest.raises(DataFormatError, match=r"\(N, 5, S, S\)"):
        inspect(tmp_path / "bad.h5")


@pytest.mark.slow
def test_ddp_with_two_cpu_processes_on_gloo(tiny_data, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", "29517",
           "-m", "photoz", "train", "--data", str(tiny_data), "--out", str(out), "--variant", "pasquet2019_tiny",
           "--epochs", "1", "--batch-size", "8", "--workers", "0", "--max-steps-per-epoch", "2",
           "--validation-fraction", "0.2", "--device", "cpu", "--quiet"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    assert len(rows) == 1
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["epoch"] == 1


def test_fine_tuning_starts_from_a_bundles_weights(tiny_data, tmp_path):
    """--init-from a bundle: the network starts with the weights ONNX Runtime runs (PReLU slopes included, found
    through the graph), with or without dropout modules in its head; the checkpoint and the next bundle's training
    record name what it started from; another architecture is refused, saying which weights differ."""
    from photoz.training.fit.checkpoints import load_initial_weights
    from photoz.training.release.export import export_checkpoint

    first = train(tiny_config(tiny_data, tmp_path / "first", epochs=1), progress=False)
    bundle = export_checkpoint(ExportJob(first / "best.pt", tmp_path / "first.onnx", "tiny-first", "0.1.0"))
    with h5py.File(tiny_data) as h5:
        images, ebv = h5["images"][:6], h5["ebv"][:6]
    expected = OnnxPredictor(bundle, providers="cpu").predict(images, ebv)
    # learning rate 0: the fine-tuned network is still the bundle's, so torch must give ONNX Runtime's numbers
    for dropout in (0.0, 0.3):
        run = train(tiny_config(tiny_data, tmp_path / f"tuned{dropout}", epochs=1, lr=0.0, dropout=dropout,
                                init_from=str(bundle.path)), progress=False)
        net, state = load_checkpoint(run / "last.pt")
        with torch.no_grad():
            got = net(torch.from_numpy(images), torch.from_numpy(ebv).reshape(-1, 1)).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert state["initialised_from"]["sha256"] == load_bundle(bundle.path).sha256
        assert state["initialised_from"]["version"] == "0.1.0"
    tuned = export_checkpoint(ExportJob(run / "last.pt", tmp_path / "tuned.onnx", "tiny-tuned", "0.2.0",
                                        thresholds=False))
    document = load_bundle(tuned.path).metadata.document
    assert document["training"]["initialised_from"]["model"] == "tiny-first"
    assert "quality" in load_bundle(bundle.path).metadata.document and "quality" not in document  # --no-thresholds
    from photoz.training.release.model_card import render

    metrics = {"point_estimate": "z_mean", "sigma_mad": 0.02, "outlier_fraction": 0.01, "bias": 0.0, "crps": 0.01,
               "pit_ks": 0.03, "n": 10, "by_redshift": []}
    card = render(tuned.path, {"data": "t.h5", "n": 10, "model_metrics": metrics}, [])
    assert "- initialised from `first.onnx` (tiny-first 0.1.0, sha256 `" in card and "fine-tuned" in card
    # starting from a checkpoint works the same way
    run = train(tiny_config(tiny_data, tmp_path / "from-pt", epochs=1, lr=0.0, init_from=str(first / "best.pt")),
                progress=False)
    assert torch.equal(torch.load(run / "last.pt", weights_only=False)["model"]["classifier.4.weight"],
                       torch.load(first / "best.pt", weights_only=False)["model"]["classifier.4.weight"])
    # a bundle with a PIT map in its graph (as the shipped one) holds the network under a prefix: its weights
    # are the network's, the map is left behind
    import json

    from photoz.model.recalibration import PITMap

    u = np.linspace(0, 1, 11)
    (tmp_path / "map.json").write_text(json.dumps({"map": PITMap(np.array([0.05, 0.15, 0.3]),
                                                                np.stack([u ** 0.7, u, u ** 1.4])).to_metadata()}))
    mapped = export_checkpoint(ExportJob(first / "best.pt", tmp_path / "mapped.onnx", "tiny-mapped", "0.1.1",
                                         thresholds=False, pit_map=tmp_path / "map.json"))
    net, _ = load_checkpoint(first / "best.pt")
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.zero_()
    load_initial_weights(net, mapped.path)
    reference = torch.load(first / "best.pt", weights_only=False)["model"]
    assert all(torch.equal(value, reference[name]) for name, value in net.state_dict().items())
    from photoz.model.network.pasquet import build, variant_config

    wider = build(variant_config("pasquet2019_half", n_bins=180))
    with pytest.raises(ValueError, match="weight shapes differ"):
        load_initial_weights(wider, bundle.path)


def test_ensemble_members_share_a_split_seed_and_a_pit_map_is_fitted_and_applied_in_the_graph(tiny_data, tmp_path):
    """Members trained with different --seed and one --split-seed have one validation set (the one the PIT map
    is fitted on); photoz calibrate-pit fits the map on those rows and photoz export --pit-map puts it in the
    graph: ONNX Runtime gives the map applied (in numpy) to the torch PDFs, and the bundle records it."""
    from photoz.model.recalibration import PITMap
    from photoz.training.fit.train import split_seed, training_split
    from photoz.training.release.export import export_checkpoint
    from photoz.training.release.pit_calibration import main as calibrate_main

    runs = [train(tiny_config(tiny_data, tmp_path / f"m{seed}", seed=seed, split_seed=0, epochs=1), progress=False)
            for seed in (0, 1)]
    configs = [load_checkpoint(r / "best.pt")[1]["train_config"] for r in runs]
    assert [split_seed(c) for c in configs] == [0, 0] and [c["seed"] for c in configs] == [0, 1]
    n = inspect(tiny_data)["n"]
    shared = [training_split(tiny_data, n, 0.2, split_seed(c))[1].tolist() for c in configs]
    assert shared[0] == shared[1]
    assert training_split(tiny_data, n, 0.2, 1)[1].tolist() != shared[0]  # the seed alone would have moved it

    report_path = tmp_path / "pit-map.json"
    assert calibrate_main(["--model", str(runs[0] / "best.pt"), "--data", str(tiny_data), "--out", str(report_path),
                           "--validation-of", str(runs[0] / "best.pt"), "--prior-count", "1"]) == 0
    import json

    report = json.loads(report_path.read_text())
    assert report["fitted_on"]["n"] == len(shared[0])
    pit_map = PITMap.from_metadata(report["map"])
    bundle = export_checkpoint(ExportJob(runs[0] / "best.pt", tmp_path / "pit.onnx", "tiny-pit", "0.0.1",
                                         thresholds=False, pit_map=report_path))
    document = load_bundle(bundle.path).metadata.document
    np.testing.assert_allclose(document["recalibration"]["table"], pit_map.table, atol=1e-6)
    assert document["training"]["pit_recalibration"]["fitted_on"]["n"] == len(shared[0])
    with h5py.File(tiny_data) as h5:
        images, ebv = h5["images"][:8], h5["ebv"][:8]
    net, _ = load_checkpoint(runs[0] / "best.pt")
    with torch.no_grad():
        plain = net(torch.from_numpy(images), torch.from_numpy(ebv).reshape(-1, 1)).numpy()
    bins = load_bundle(bundle.path).metadata.bins
    expected = pit_map.apply(plain, bins)
    assert np.abs(expected - plain).max() > 1e-3  # the map does something here
    np.testing.assert_allclose(OnnxPredictor(bundle, providers="cpu").predict(images, ebv), expected, atol=1e-5)
    with pytest.raises(ValueError, match="already applies a PIT map"):
        calibrate_main(["--model", str(bundle.path), "--data", str(tiny_data), "--out", str(tmp_path / "x.json")])
    from photoz.training.release.model_card import render

    report = {"data": "tiny.h5", "n": 6, "model_metrics": {"point_estimate": "z_mean", "sigma_mad": 0.1,
              "outlier_fraction": 0.5, "bias": 0.0, "crps": 0.1, "pit_ks": 0.5, "n": 6, "by_redshift": []}}
    card = render(bundle.path, report, [])
    assert (f"conditional PIT recalibration (photoz calibrate-pit): each PDF's CDF mapped by the PIT distribution of "
            f"objects with a similar photometric redshift ({pit_map.z_knots.size} knots") in card
    assert f"fitted on {len(shared[0])} objects of `{tiny_data.name}` (validation rows of best.pt" in card
    assert "refit it on labelled galaxies of that data" in card


def test_photoz_ship_releases_a_run_as_make_ship_did(tiny_data, tmp_path):
    """`photoz ship`: a candidate scored on the held-out set, the bundle exported with that score and its flags'
    thresholds, the flags' report and the model card beside the bundle; the shipped graph is the scored one."""
    from photoz.cli import main

    run = train(tiny_config(tiny_data, tmp_path / "run"), progress=False)
    out = tmp_path / "bundles" / "tiny.onnx"
    assert main(["ship", "--run", str(run), "--train-data", str(tiny_data), "--test-data", str(tiny_data),
                 "--version", "0.0.9", "--name", "tiny-ship", "--out", str(out)]) == 0
    shipped, candidate = load_bundle(out), load_bundle(run / "candidate.onnx")
    doc = shipped.metadata.document
    assert (shipped.metadata.name, shipped.metadata.version) == ("tiny-ship", "0.0.9")
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["model"] == str(candidate.path) and metrics["n"] == 160
    assert doc["training"]["metrics"]["held_out"]["sigma_mad"] == metrics["model_metrics"]["sigma_mad"]
    assert "quality" in doc and "quality" not in candidate.metadata.document  # thresholds on the shipped one only
    assert (run / "eval" / "ood_flags.json").is_file()
    card = out.with_suffix(".md").read_text()
    assert shipped.sha256 in card and "## Held-out metrics" in card and "Injected out-of-range objects" in card
    with h5py.File(tiny_data) as h5:
        images, ebv = h5["images"][:6], h5["ebv"][:6]
    np.testing.assert_array_equal(OnnxPredictor(shipped, providers="cpu").predict(images, ebv),
                                  OnnxPredictor(candidate, providers="cpu").predict(images, ebv))
