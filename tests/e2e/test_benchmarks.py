"""Every benchmark still runs: each script in benchmarks/ once with tiny settings, its JSON checked for the rows
its table promises. Numbers are not judged here (that is what the benchmarks are for); rot is."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
needs_wrk = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk; "
                                                                   ".ci/run installs it)")


def run_benchmark(name: str, args: list[str], out: Path, timeout_s: float = 300) -> dict:
    """``python -m benchmarks.<name> args --out out``: its one JSON report."""
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = list(out.glob("*.json"))
    assert len(reports) == 1, reports
    assert len(done.stdout.splitlines()) >= 3  # it printed its table
    return json.loads(reports[0].read_text())


@pytest.fixture(scope="module")
def tiny_sims(tmp_path_factory):
    from photoz.training.simulation.simulate import simulate

    folder = tmp_path_factory.mktemp("sims")
    return [simulate(folder / f"{name}.h5", n, seed=seed, workers=1, chunk_size=64, progress=False)
            for name, n, seed in (("train", 192, 31), ("test", 64, 32))]


def test_bundles(tiny_bundle, tmp_path):
    report = run_benchmark("bundles", [str(tiny_bundle), str(tiny_bundle), "--n", "16", "--rounds", "1",
                                       "--batch-size", "8"], tmp_path)
    assert [r["ratio"] for r in report["rows"]][0] == 1.0 and len(report["rows"]) == 2
    assert all(r["cutouts_per_s"] > 0 for r in report["rows"])


def test_catalogue_information(tiny_sims, tmp_path):
    train, test = tiny_sims
    report = run_benchmark("catalogue_information", ["--train", str(train), "--test", str(test)], tmp_path)
    assert report["n_train"] == 192 and report["n_test"] == 64
    assert "model r + 4 colours" in report["rows"] and len(report["rows"]) == 5


def test_flags(tmp_path):
    report = run_benchmark("flags", ["--n", "64", "--batch", "32", "--threads", "1,2", "--rounds", "1"], tmp_path)
    assert set(report["flags_cutouts_per_s"]) == {"1", "2"} and report["engine_cutouts_per_s"] > 0


def test_model_magnitudes(tmp_path):
    report = run_benchmark("model_magnitudes", ["--n", "60", "--seeds", "1"], tmp_path)
    assert set(report["colour_shift_median_mag"]) == {"u-g", "g-r", "r-i", "i-z"}
    assert report["knn_perfect_fit"]["n"] == report["knn_sdss_style"]["n"] > 0


def test_predict(tiny_bundle, tmp_path):
    report = run_benchmark("predict", ["--n", "256", "--model", str(tiny_bundle), "--batch-size", "16",
                                       "--chunk-size", "32", "--rounds", "1"], tmp_path)
    assert any(key.startswith("photoz predict --dask local:2") for key in report["objects_per_s"])
    assert report["predict_over_engine"] > 0


def test_simulate(tmp_path):
    report = run_benchmark("simulate", ["--n", "64", "--chunk-size", "32", "--workers", "1,2", "--rounds", "1"],
                           tmp_path)
    assert set(report["galaxies_per_s"]) == {"1", "2"}


def test_train_speed(tmp_path):
    report = run_benchmark("train_speed", ["--device", "cpu", "--variants", "pasquet2019_tiny", "--batch-sizes", "8",
                                           "--steps", "1"], tmp_path)
    assert {r["variant"] for r in report["rows"]} == {"pasquet2019_tiny"} and report["rows"][0]["cutouts_per_s"] > 0


@needs_wrk
def test_serve(tiny_bundle, tmp_path):
    report = run_benchmark("serve", ["--model", str(tiny_bundle), "--duration", "1", "--connections", "1,4",
                                     "--offline-seconds", "0.5", "--scan-seconds", "0.2", "--skip-litserve"],
                           tmp_path)
    servers = {(r["server"], r["connections"], r["cutouts_per_request"]) for r in report["rows"]}
    assert {c for _, c, n in servers if n == 1} == {1, 4} and any(n == 256 for _, _, n in servers)
    assert report["offline_best"] > 0 and all("ratio_to_offline" in r for r in report["rows"])
    # the targets it can judge at these load points: the 256-cutout one, not the 32-connection one
    assert [t["target"].split(" >=")[0] for t in report["targets"]] == ["256-cutout requests"]


def test_serve_judges_a_gpu_run_by_its_targets():
    """A GPU run's report says which of issue 28's GPU targets it met: each judged on its own load point."""
    from benchmarks.serve import over_litserve, targets

    def row(server, connections, per_request, cutouts_per_s, workers=1, p50=3.0, p99=80.0, ratio=1.0):
        return {"server": server, "connections": connections, "cutouts_per_request": per_request, "workers": workers,
                "cutouts_per_s": cutouts_per_s, "p50_ms": p50, "p99_ms": p99, "ratio_to_offline": ratio}

    rows = [row("photoz", 1, 1, 300, p50=4.0), row("photoz", 256, 1, 8_000, p99=90.0),
            row("photoz", 256, 1, 12_000, workers=4, p99=95.0), row("photoz", 2, 256, 30_000, ratio=0.85),
            row("photoz-oip", 2, 256, 28_000, ratio=0.75), row("litserve", 256, 1, 5_000)]
    report = {"rows": rows, "photoz_over_litserve": over_litserve(rows)}
    assert report["photoz_over_litserve"] == {"256": 1.6, "256, 4 workers": 2.4}
    judged = {t["target"].split(" ")[0] + " " + t["target"].split(" ")[1]: t for t in targets(report, gpu=True)}
    assert judged["256-cutout requests"]["met"] is False  # the OIP round, 0.75 < 0.8
    assert judged["single cutouts"]["met"] is True and "4 workers" in judged["single cutouts"]["measured"]
    assert judged["a lone"]["met"] is True and judged["photoz >="]["met"] is True
    rows[2]["p99_ms"] = 140.0  # fast enough, but too slow in the tail
    assert not {t["target"]: t for t in targets(report, gpu=True)}[
        "single cutouts at 256 connections >= 10,000/s, p99 <= 100 ms"]["met"]


@needs_wrk
def test_serve_overhead(tiny_bundle, tmp_path):
    # two-second windows: a fresh-clone run beside the other tests once saw a one-second window answer nothing
    report = run_benchmark("serve_overhead", ["--model", str(tiny_bundle), "--duration", "2", "--connections", "4",
                                              "--workers", "1,2", "--responses", "full", "--warmup", "1"], tmp_path)
    assert report["warmup_s"] == 1
    assert [(r["workers"], r["connections"]) for r in report["rows"]] == [(1, 4), (2, 4)]
    assert all(r["errors"] == 0 and r["server_cpu_ms_per_request"] > 0 for r in report["rows"])
    [scaling] = report["scaling"]
    assert scaling["workers"] == 2 and scaling["requests_per_s_ratio"] > 0


def test_serve_overhead_scaling_skips_a_point_that_answered_nothing_and_warm_up_waits_for_answers():
    """A load point whose one-worker run completed no request has no ratio (it once divided by zero), and the
    warm-up goes on, window after window, until the server answers (at most WARMUP_WINDOWS)."""
    from benchmarks.serve_overhead import WARMUP_WINDOWS, scaling, warm_up

    def row(workers, connections, requests):
        return {"workers": workers, "response": "JSON", "connections": connections, "requests": requests,
                "requests_per_s": requests / 2.0, "server_cpu_ms_per_request": 0.5}

    rows = [row(1, 4, 0), row(2, 4, 900), row(1, 32, 1000), row(2, 32, 1500)]
    assert [(s["connections"], s["requests_per_s_ratio"]) for s in scaling(rows)] == [(32, 1.5)]
    answers = iter([0, 0, 7])
    calls = []

    def fake_wrk(*args):
        calls.append(args)
        return {"requests": next(answers, 0)}

    assert warm_up(fake_wrk, "http://x/v1/predict", Path("b.npy"), 4, 1) == 3 and len(calls) == 3
    calls.clear()
    assert warm_up(lambda *a: calls.append(a) or {"requests": 0}, "u", Path("b"), 4, 1) == WARMUP_WINDOWS
    assert len(calls) == WARMUP_WINDOWS


@needs_wrk
def test_overload(tiny_bundle, tmp_path):
    # refusals answered at once: held ones (1 s each) give ~64 refusals in the 2 s phase, ~10 ms of CPU, one
    # /proc tick or none; at once, thousands, so the per-refusal CPU is measured rather than rounded to zero
    report = run_benchmark("overload", ["--model", str(tiny_bundle), "--duration", "2", "--storms", "64",
                                        "--settle", "0.5", "--server-flag", "refusal_delay_ms=0"], tmp_path)
    assert [r["load"] for r in report["rows"]] == ["capacity", "storm", "refusals only"]
    assert report["rows"][0]["goodput_per_s"] > 0 and report["rows"][1]["goodput_per_s"] > 0
    refusals_only = report["rows"][2]
    assert refusals_only["cpu_ms_per_refusal"] > 0 and refusals_only["server_refusals"] > 0
    assert refusals_only["successes"] == 0  # the queue was held full the whole phase: nothing else got in


def test_rail(tmp_path):
    pytest.importorskip("rail.estimation.algos.photoz_image", reason="the RAIL stages need Python >= 3.11")
    report = run_benchmark("rail", ["--n", "64", "--chunk-size", "32", "--batch-size", "16", "--rounds", "1"],
                           tmp_path)
    assert [r["route"] for r in report["rows"]] == ["photoz predict", "RAIL PhotozImageEstimator"]
    assert report["rows"][0]["ratio"] == 1.0 and report["rows"][1]["objects_per_s"] > 0


def test_priors(tmp_path):
    from photoz.training.simulation.simulate import simulate

    data = simulate(tmp_path / "data" / "held_out.h5", 512, seed=41, workers=1, chunk_size=256, progress=False)
    # the held-out file stands in for the reference catalogue whose cuts give the completeness
    report = run_benchmark("priors", ["--data", str(data), "--n", "512", "--reference", str(data)], tmp_path / "out")
    assert report["train_prior_unchanged_max_abs"] == 0.0
    assert report["rows"][0]["sample"].startswith("all") and report["rows"][0]["n"] == 512
    by_sample: dict[str, set] = {}
    for row in report["rows"]:
        by_sample.setdefault(row["sample"], set()).add(row["prior"])
    assert by_sample[report["rows"][0]["sample"]] == {"train", "self", "true n(z)"}  # not a cut: no selection
    red = next(s for s in by_sample if s.startswith("red sequence"))  # ~60% of the galaxies: over 200
    assert by_sample[red] == {"train", "self", "true n(z)", "self + selection", "true n(z) + selection"}


#: modules of benchmarks/ that are not benchmarks themselves, and the benchmark whose smoke run drives each
HELPERS = {"loadgen": "serve"}


def test_every_benchmark_has_a_smoke_run_here():
    """A new script in benchmarks/ without a smoke run above fails here (helpers: run by a benchmark that has one,
    and named in HELPERS with it)."""
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__"}
    tests = {name.removeprefix("test_") for name in globals() if name.startswith("test_")}
    assert sorted(scripts - tests - set(HELPERS)) == []
    for helper, user in HELPERS.items():
        source = (ROOT / "benchmarks" / f"{user}.py").read_text()
        assert user in tests and (f"benchmarks.{helper}" in source or f"import {helper}" in source), helper


def test_litserve_peer(tiny_bundle, tmp_path, tiny_predictor):
    """The LitServe peer that benchmarks.serve compares against (its smoke run skips it) still starts and answers
    the engine's PDF for a cutout."""
    pytest.importorskip("litserve", reason="LitServe is a benchmark extra (pip install -e '.[bench]')")
    import base64
    import io

    import httpx
    import numpy as np

    from benchmarks.serve import start_litserve, stop_group

    cutout = np.random.default_rng(3).normal(0, 0.05, (1, 5, 64, 64)).astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, cutout[0])
    proc, url = start_litserve(tiny_bundle, 4, tmp_path / "litserve.log")
    try:
        answer = httpx.post(url + "/predict", json={"npy": base64.b64encode(buffer.getvalue()).decode()},
                            timeout=60).json()
    finally:
        stop_group(proc)
    want = tiny_predictor.predict(cutout, np.zeros(1, np.float32))[0]
    np.testing.assert_allclose(answer["pdf"], want, atol=1e-6)
    assert len(answer["bins"]) == len(want) + 1 and 0 < answer["z_median"] < 0.4
