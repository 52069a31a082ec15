"""Offline prediction benchmark: `photoz predict` against the engine's raw throughput, and on Dask.

    python benchmarks/predict.py [--n 4096] [--model bundle.onnx]

Times, in one run on the same input (an .npy stack of N SDSS-like cutouts):
the engine alone (OnnxPredictor at the batch size predict uses, data in
memory), `photoz predict` in one process (reading, decoding and writing
included), and `photoz predict --dask local:1` / `local:2`. Prints a table of
objects/s and ratios, writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.serve import export_random_bundle  # noqa: E402
from model.bundle import load_bundle  # noqa: E402
from model.runtime import OnnxPredictor  # noqa: E402
from service.offline import predict_files  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="photoz-predict-bench-"))
    bundle = args.model or export_random_bundle(work / "bench.onnx")
    images = np.random.default_rng(0).normal(0, 0.05, (args.n, 5, 64, 64)).astype(np.float32)
    np.save(work / "stack.npy", images)

    predictor = OnnxPredictor(load_bundle(bundle), providers="cpu")
    predictor.predict_batched(images[:args.batch_size], np.zeros(args.batch_size, np.float32), args.batch_size)
    start = time.perf_counter()
    predictor.predict_batched(images, np.zeros(args.n, np.float32), args.batch_size)
    engine = args.n / (time.perf_counter() - start)

    rows = {"engine alone (in memory)": engine}
    for label, dask in (("photoz predict", None), ("photoz predict --dask local:1", "local:1"),
                        ("photoz predict --dask local:2", "local:2")):
        print(f"{label} ...", flush=True)
        start = time.perf_counter()
        predict_files([work / "stack.npy"], work / f"out-{dask or 'local'}.parquet", model=bundle,
                      providers="cpu", chunk_size=args.chunk_size, batch_size=args.batch_size, progress=False,
                      dask=dask)
        rows[label] = args.n / (time.perf_counter() - start)
    report = {"n": args.n, "batch_size": args.batch_size, "chunk_size": args.chunk_size, "cores": os.cpu_count(),
              "objects_per_s": rows, "predict_over_engine": rows["photoz predict"] / engine}
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
