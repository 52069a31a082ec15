"""Simulator throughput: galaxies per second with 1 and N worker processes, side by side in one run.

    python -m benchmarks.simulate [--n 1024] [--workers 1,2] [--rounds 2] [--chunk-size 256]

Each round simulates ``--n`` galaxies into a temporary file with each worker
count in turn (after one warm-up chunk builds the cached SED tables); the
table shows every round and the medians, JSON goes to benchmarks/results/.
Targets: at least 100 galaxies/s per core (issue 15), 130 (issue 31: a margin); 1.8.1 makes about 190.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from photoz.training.simulation.instrument import InstrumentConfig
from photoz.training.simulation.population import PopulationConfig
from photoz.training.simulation.render import simulate_chunk
from photoz.training.simulation.simulate import DEFAULT_CHUNK_SIZE, SIMULATOR_VERSION, simulate

RESULTS = Path(__file__).resolve().parent / "results"


def galaxies_per_s(n: int, workers: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> float:
    """Galaxies per second simulating ``n`` galaxies with ``workers`` processes."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        simulate(Path(tmp) / "t.h5", n, seed=1, workers=workers, progress=False, chunk_size=chunk_size)
        return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="as photoz simulate (256)")
    parser.add_argument("--workers", default="1,2", help="comma list of worker counts")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]
    simulate_chunk(PopulationConfig(), InstrumentConfig(), 0, 0, 8)  # build the cached tables once
    rates: dict[int, list[float]] = {w: [] for w in counts}
    for _ in range(args.rounds):
        for w in counts:
            rates[w].append(galaxies_per_s(args.n, w, args.chunk_size))
    print(f"simulator {SIMULATOR_VERSION}, {args.n} galaxies in chunks of {args.chunk_size}, {os.cpu_count()} cores")
    print(f"{'workers':>8} {'rounds (galaxies/s)':>28} {'median':>8} {'per worker':>11}")
    for w in counts:
        median = statistics.median(rates[w])
        print(f"{w:>8} {', '.join(f'{r:.0f}' for r in rates[w]):>28} {median:>8.0f} {median / w:>11.0f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"simulate-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"simulator_version": SIMULATOR_VERSION, "n": args.n, "chunk_size": args.chunk_size,
                                "cores": os.cpu_count(),
                                "galaxies_per_s": {str(w): rates[w] for w in counts}}, indent=1))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
