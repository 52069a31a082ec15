"""The RAIL estimator against `photoz predict` on the same file: what running photoz inside RAIL costs.

    python -m benchmarks.rail [--n 2048] [--model bundle.onnx] [--rounds 3]

Writes an HDF5 file of N SDSS-like cutouts (images, ebv at the root) and times, alternating for ``--rounds``
rounds (medians compared), `photoz predict` into a FITS table and the RAIL stage pair
(PhotozImageInformer, then PhotozImageEstimator writing its qp ensemble), both in this process with the same
chunk and batch sizes; reading, decoding and writing included in both. Prints a table of objects/s and the
ratio, writes JSON to benchmarks/results/. Needs the RAIL stages (make install-dev on Python >= 3.11).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from benchmarks.serve import export_random_bundle, scratch_dir  # noqa: E402
from photoz.pipeline.jobs import PredictJob  # noqa: E402
from photoz.pipeline.predict import predict_files  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--model", type=Path, help="bundle (default: a random-weight pasquet2019_half)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)

    import h5py
    from rail.core.data import TableHandle
    from rail.estimation.algos.photoz_image import PhotozImageEstimator, PhotozImageInformer

    work = scratch_dir("photoz-rail-bench-")
    bundle = args.model or export_random_bundle(work / "bench.onnx")
    data = work / "cutouts.hdf5"
    with h5py.File(data, "w") as h5:
        h5["images"] = np.random.default_rng(0).normal(0, 0.05, (args.n, 5, 64, 64)).astype(np.float32)
        h5["ebv"] = np.full(args.n, 0.03, np.float32)

    def predict_rate(k: int) -> float:
        start = time.perf_counter()
        predict_files(PredictJob([data], work / f"predict-{k}.fits", model=bundle, chunk_size=args.chunk_size,
                                 batch_size=args.batch_size, quiet=True))
        return args.n / (time.perf_counter() - start)

    def rail_rate(k: int) -> float:
        start = time.perf_counter()
        model = PhotozImageInformer.make_stage(name=f"inform_{k}", bundle=str(bundle),
                                               model=str(work / f"model-{k}.pkl")).inform()
        estimator = PhotozImageEstimator.make_stage(name=f"estimate_{k}", model=model, chunk_size=args.chunk_size,
                                                    batch_size=args.batch_size, output=str(work / f"rail-{k}.hdf5"))
        ensemble = estimator.estimate(TableHandle("input", path=str(data))).data
        assert ensemble.npdf == args.n
        return args.n / (time.perf_counter() - start)

    predict_rate(-1)  # warm-up: the bundle's first load, the page cache
    rates: dict[str, list[float]] = {"photoz predict": [], "RAIL PhotozImageEstimator": []}
    for k in range(args.rounds):
        rates["photoz predict"].append(predict_rate(k))
        rates["RAIL PhotozImageEstimator"].append(rail_rate(k))
        print(f"round {k + 1}: predict {rates['photoz predict'][-1]:.0f}/s, RAIL "
              f"{rates['RAIL PhotozImageEstimator'][-1]:.0f}/s", flush=True)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    base = medians["photoz predict"]
    rows = [{"route": name, "objects_per_s": value, "ratio": value / base, "rounds": rates[name]}
            for name, value in medians.items()]
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "bundle": str(bundle), "n": args.n, "chunk_size": args.chunk_size, "batch_size": args.batch_size,
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"rail-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    print("\n| route | objects/s (median) | x photoz predict |\n| --- | --- | --- |")
    for r in rows:
        print(f"| {r['route']} | {r['objects_per_s']:.0f} | {r['ratio']:.2f} |")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
