"""Bundles side by side: the engine's throughput (cutouts/s, CPU) for each, in alternating rounds.

    python -m benchmarks.bundles model/bundles/photoz-sdss-sim.onnx runs/x/mc.onnx [--n 1024] [--rounds 5]

What a new bundle costs against the shipped one (an ensemble or MC dropout pays for its members or passes):
each round runs every bundle once over the same N simulated-looking cutouts at ``--batch-size``, the
PDF and point estimates included (``predict_with_estimates``, what serving runs, the image flags off);
the medians are compared with the first bundle's. The serving stack adds the same cost per request to
every bundle, so a served ratio is closer to 1 than the engine's. Prints a table, writes JSON to
benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from photoz.model.bundle import load_bundle  # noqa: E402
from photoz.model.runtime import OnnxPredictor  # noqa: E402


def cutouts(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.normal(0, 0.05, (n, 5, 64, 64)).astype(np.float32)
    images[:, :, 28:36, 28:36] += rng.uniform(1, 30, (n, 5, 1, 1)).astype(np.float32)
    return images, rng.uniform(0, 0.1, n).astype(np.float32)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    images, ebv = cutouts(args.n)
    engines = [OnnxPredictor(load_bundle(p), providers="cpu", intra_op_threads=args.threads) for p in args.bundles]
    rates: list[list[float]] = [[] for _ in engines]

    def run(engine) -> float:
        start = time.perf_counter()
        for i in range(0, args.n, args.batch_size):
            engine.predict_with_estimates(images[i:i + args.batch_size], ebv[i:i + args.batch_size],
                                          image_flags=False)
        return args.n / (time.perf_counter() - start)

    for engine in engines:  # warm-up
        engine.predict_with_estimates(images[: args.batch_size], ebv[: args.batch_size], image_flags=False)
    for _ in range(args.rounds):
        for k, engine in enumerate(engines):
            rates[k].append(run(engine))
    medians = [statistics.median(r) for r in rates]
    rows = []
    print(f"engine throughput, CPU, {args.threads} threads, batch {args.batch_size}, {args.n} cutouts x "
          f"{args.rounds} alternating rounds")
    print("| bundle | version | cutouts/s (median) | ratio to the first |\n| --- | --- | --- | --- |")
    for path, engine, median, rounds in zip(args.bundles, engines, medians, rates, strict=True):
        version = engine.metadata.version
        rows.append({"bundle": str(path), "version": version, "cutouts_per_s": median,
                     "ratio": median / medians[0], "rounds": rounds})
        print(f"| {path.name} | {version} | {median:.0f} | {median / medians[0]:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"bundles-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"n": args.n, "batch_size": args.batch_size, "threads": args.threads, "rows": rows},
                              indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
