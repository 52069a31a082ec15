"""Quality-flag throughput: cutouts/s of the flags' feature measurement with 1, 2, 4, ... threads.

    python -m benchmarks.flags [--n 4096] [--batch 256] [--threads 1,2,4,8] [--rounds 3] [--model B] [--providers cuda]

The server measures each batch's quality flags on its finishing threads
(``PHOTOZ_FLAG_WORKERS``) beside the model calls. On a GPU the network
runs tens of thousands of cutouts/s, so the flags need enough threads to
keep up: this measures how their rate grows with threads on this machine
(numpy releases the GIL in its array loops, not between them), next to
the engine's own rate on the same batches. Prints a table, writes JSON to
benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def sky_cutouts(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """SDSS-like cutouts (nanomaggies): a round galaxy of r ~ 16-17.5 on each band's sky noise."""
    from photoz.model.conventions import BANDS, CUTOUT_SIZE_PIXELS, sky_sigma_nmgy_per_pixel

    rng = np.random.default_rng(seed)
    c = (CUTOUT_SIZE_PIXELS - 1) / 2
    y, x = np.mgrid[:CUTOUT_SIZE_PIXELS, :CUTOUT_SIZE_PIXELS]
    profile = np.exp(-np.hypot(x - c, y - c) / 3.0)
    profile /= profile.sum()
    flux = 10 ** (-0.4 * (rng.uniform(16, 17.5, n) - 22.5))
    sigma = np.array([sky_sigma_nmgy_per_pixel(b) for b in BANDS], np.float32)
    images = (flux[:, None, None, None] * profile[None, None] +
              rng.normal(0, 1, (n, len(BANDS), CUTOUT_SIZE_PIXELS, CUTOUT_SIZE_PIXELS)) * sigma[None, :, None, None])
    return images.astype(np.float32), rng.uniform(0.01, 0.1, n).astype(np.float32)


def rate(work, batches: list, threads: int) -> float:
    """Cutouts/s of ``work(images, ebv)`` over ``batches`` with ``threads`` threads."""
    n = sum(len(b[0]) for b in batches)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda b: work(*b), batches[:threads]))  # warm
        start = time.perf_counter()
        list(pool.map(lambda b: work(*b), batches))
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    from photoz.model.bundle import load_bundle
    from photoz.model.runtime import OnnxPredictor

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", default=None, help="comma list (default 1, 2, 4, ... up to the cores)")
    parser.add_argument("--model", type=Path, default=ROOT / "model" / "bundles" / "photoz-sdss-sim.onnx")
    parser.add_argument("--providers", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    counts = [int(t) for t in args.threads.split(",")] if args.threads else \
        [t for t in (1, 2, 4, 8, 16, 32) if t <= cores]
    predictor = OnnxPredictor(load_bundle(args.model), providers=args.providers)
    images, ebv = sky_cutouts(args.n)
    batches = [(images[i:i + args.batch], ebv[i:i + args.batch]) for i in range(0, args.n, args.batch)]
    rounds: dict[int, list[float]] = {t: [] for t in counts}
    engine_rounds = []
    for _ in range(args.rounds):  # alternating: this machine's speed drifts within minutes
        engine_rounds.append(rate(predictor.predict, batches, 1))
        for t in counts:
            rounds[t].append(rate(predictor.image_flag_bits, batches, t))
    engine = statistics.median(engine_rounds)
    flags = {t: statistics.median(r) for t, r in rounds.items()}
    print(f"{args.n} cutouts in batches of {args.batch}, {cores} cores, engine {predictor.provider}; "
          f"medians of {args.rounds} alternating rounds")
    print(f"{'':<22}{'cutouts/s':>12}{'x engine':>10}")
    print(f"{'engine (1 thread)':<22}{engine:>12.0f}{1.0:>10.2f}")
    for t, r in flags.items():
        print(f"{f'flags, {t} thread(s)':<22}{r:>12.0f}{r / engine:>10.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"flags-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"n": args.n, "batch": args.batch, "cores": cores, "provider": predictor.provider,
                                "engine_cutouts_per_s": engine,
                                "flags_cutouts_per_s": {str(t): r for t, r in flags.items()},
                                "rounds": {"engine": engine_rounds, **{str(t): r for t, r in rounds.items()}}},
                               indent=1))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
