"""Training-room subcommands: simulate, train, evaluate, export, baseline.

Only argparse is imported here; each handler imports what it needs, so the
``photoz`` command starts fast and serving-only installs never touch torch.
"""
from __future__ import annotations

import argparse


def _simulate(args) -> int:
    from training.sim.simulate import simulate

    path = simulate(args.out, args.n, seed=args.seed, workers=args.workers, chunk_size=args.chunk_size,
                    progress=not args.quiet)
    print(f"wrote {args.n} galaxies to {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="simulate SDSS-like galaxy cutouts to an HDF5 data set",
                       description="Simulate SDSS Main Galaxy Sample cutouts with GalSim. Deterministic for a "
                                   "seed; re-running with a larger --n extends the file, an interrupted run "
                                   "resumes where it stopped.")
    p.add_argument("--n", type=int, required=True, help="number of galaxies in the data set")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", required=True, help="output HDF5 file")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--chunk-size", type=int, default=256, help="galaxies per deterministic chunk (default 256)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_simulate)
