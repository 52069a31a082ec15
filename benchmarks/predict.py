"""Offline prediction benchmark: `photoz predict` against the engine's raw throughput, and on Dask.

    python -m benchmarks.predict [--n 4096] [--model bundle.onnx]

Times, in one run on the same input (an .npy stack of N SDSS-like cutouts):
the engine alone (OnnxPredictor as predict runs it, data in memory, at batch
sizes 16 to 256, then at the best one), `photoz predict` in one process
(reading, decoding and writing included), alternating with the engine for
``--rounds`` rounds (medians compared), and `photoz predict --dask local:1` /
`local:2`. Prints a table of
objects/s and ratios, writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from benchmarks.serve import export_random_bundle, scratch_dir  # noqa: E402
from photoz.model.bundle import load_bundle  # noqa: E402
from photoz.model.runtime import OnnxPredictor  # noqa: E402
from photoz.pipeline.jobs import PredictJob  # noqa: E402
from photoz.pipeline.predict import predict_files  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3, help="alternating engine / predict rounds")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    work = scratch_dir("photoz-predict-bench-")
    bundle = args.model or export_random_bundle(work / "bench.onnx")
    images = np.random.default_rng(0).normal(0, 0.05, (args.n, 5, 64, 64)).astype(np.float32)
    np.save(work / "stack.npy", images)

    # the engine alone, as predict runs it (one session, all cores): first its best batch size ...
    predictor = OnnxPredictor(load_bundle(bundle), providers="cpu")
    scan_n = min(args.n, 1024)
    per_batch = {}
    for size in (16, 32, 64, 128, 256):
        predictor.predict_batched(images[:size], np.zeros(size, np.float32), size)  # warm-up of this shape
        start = time.perf_counter()
        predictor.predict_batched(images[:scan_n], np.zeros(scan_n, np.float32), size)
        per_batch[size] = scan_n / (time.perf_counter() - start)
    best_size = max(per_batch, key=per_batch.get)
    print("engine alone: " + ", ".join(f"batch {k}: {v:.0f}/s" for k, v in per_batch.items()), flush=True)

    def engine_rate() -> float:
        start = time.perf_counter()
        predictor.predict_batched(images, np.zeros(args.n, np.float32), best_size)
        return args.n / (time.perf_counter() - start)

    def predict_rate(dask=None, tag="local") -> float:
        start = time.perf_counter()
        predict_files(PredictJob([work / "stack.npy"], work / f"out-{tag}.parquet", model=bundle, providers="cpu",
                                 chunk_size=args.chunk_size, batch_size=args.batch_size, quiet=True, dask=dask))
        return args.n / (time.perf_counter() - start)

    # ... then engine and predict alternately, so that the machine's drift hits both alike
    engine_runs, predict_runs = [], []
    for k in range(args.rounds):
        print(f"round {k + 1}/{args.rounds}: engine, photoz predict ...", flush=True)
        engine_runs.append(engine_rate())
        predict_runs.append(predict_rate(tag=f"local{k}"))
    engine, predicted = float(np.median(engine_runs)), float(np.median(predict_runs))
    rows = {f"engine alone (in memory, batch {best_size}; median of {args.rounds})": engine,
            f"photoz predict (median of {args.rounds})": predicted}
    for label, dask in (("photoz predict --dask local:1", "local:1"), ("photoz predict --dask local:2", "local:2")):
        print(f"{label} ...", flush=True)
        rows[label] = predict_rate(dask, dask.replace(":", ""))
    report = {"n": args.n, "batch_size": args.batch_size, "chunk_size": args.chunk_size, "cores": os.cpu_count(),
              "engine_per_batch_size": per_batch, "engine_best_batch_size": best_size,
              "engine_runs": engine_runs, "predict_runs": predict_runs,
              "objects_per_s": rows, "predict_over_engine": predicted / engine}
    print("\n| route | objects/s | x engine |\n| --- | --- | --- |")
    for label, rate in rows.items():
        print(f"| {label} | {rate:.0f} | {rate / engine:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"predict-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
