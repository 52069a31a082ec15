"""Priors on samples unlike the training set: bias and PIT with the training prior, prior=self and the true n(z).

    python -m benchmarks.priors --data sim-test.h5 [--model bundle.onnx] [--n 8192]

Runs the bundle over a labelled simulated data set once, then scores subsamples whose n(z) differs from the
training set's, as survey users' samples do: all of it (the training population), bright (dereddened
Petrosian r < 17), the red sequence (dereddened model u - r >= 2.22, Strateva et al. 2001) and a redshift
shell (objects kept with probability exp(-(z - 0.15)^2 / (2 x 0.03^2)), seeded). Each is scored with its PDFs
under the training prior (as the network gives them), under ``prior=self`` (the subsample's own n(z) by EM,
photoz.model.priors) and under its true n(z) (a custom histogram of its true redshifts on the model's bins).
Prints a table (bias = mean dz of the PDF mean, sigma_MAD, PIT KS) and writes JSON to benchmarks/results/.
The bundle must record its training n(z) (photoz record-prior).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from photoz.model.bundle import load_bundle  # noqa: E402
from photoz.model.conventions import BANDS, EXTINCTION_A_OVER_EBV  # noqa: E402
from photoz.model.pdf import photoz_metrics, point_estimates  # noqa: E402
from photoz.model.priors import MIN_OBJECTS_SELF, for_population, resolve, reweight, training_nz  # noqa: E402
from photoz.model.runtime import OnnxPredictor  # noqa: E402

DEFAULT_MODEL = ROOT / "model" / "bundles" / "photoz-sdss-sim.onnx"
#: The red-sequence separator in dereddened u - r (Strateva et al. 2001), mag.
RED_SEQUENCE_U_MINUS_R = 2.22
#: The redshift shell's centre and width.
SHELL_Z, SHELL_SIGMA = 0.15, 0.03


def dereddened(mags: np.ndarray, ebv: np.ndarray, band: str) -> np.ndarray:
    return mags[:, BANDS.index(band)] - EXTINCTION_A_OVER_EBV[band] * ebv


def subsamples(data: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """Row masks of the samples scored."""
    ebv, z = data["ebv"], data["z"]
    petro_r = dereddened(data["petro_mag"], ebv, "r")
    u_minus_r = dereddened(data["model_mag"], ebv, "u") - dereddened(data["model_mag"], ebv, "r")
    keep = np.random.default_rng(seed).uniform(size=z.size) < np.exp(-0.5 * ((z - SHELL_Z) / SHELL_SIGMA) ** 2)
    return {"all (the training population)": np.ones(z.size, bool), "bright: r < 17": petro_r < 17.0,
            f"red sequence: u - r >= {RED_SEQUENCE_U_MINUS_R}": u_minus_r >= RED_SEQUENCE_U_MINUS_R,
            f"redshift shell around z = {SHELL_Z}": keep}


def read(path: Path, n: int) -> dict[str, np.ndarray]:
    import h5py

    with h5py.File(path, "r") as h5:
        return {"images": np.asarray(h5["images"][:n], np.float32), "ebv": np.asarray(h5["ebv"][:n], np.float32),
                "z": np.asarray(h5["z"][:n], np.float64), "petro_mag": h5["catalogue/petro_mag"][:n],
                "model_mag": h5["catalogue/model_mag"][:n]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="labelled simulated HDF5 (photoz simulate)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--n", type=int, default=8192, help="rows of --data to use (the first N)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    bundle = load_bundle(args.model)
    bins = bundle.metadata.bins
    train = training_nz(bundle.metadata.document, bins)
    if train is None:
        raise SystemExit(f"{args.model} does not record its training n(z): photoz record-prior first")
    data = read(args.data, args.n)
    start = time.perf_counter()
    probs = OnnxPredictor(bundle, providers="cpu").predict_batched(data["images"], data["ebv"], 128)
    print(f"{len(probs)} PDFs in {time.perf_counter() - start:.0f} s", flush=True)
    rows = []
    for name, mask in subsamples(data).items():
        p, z = probs[mask], data["z"][mask]
        if len(z) < MIN_OBJECTS_SELF:
            print(f"{name}: {len(z)} objects, fewer than prior=self takes; skipped")
            continue
        true_nz = resolve("custom", bins, train, bins.edges, np.histogram(z, bins.edges)[0] + 0.5)
        priors = {"train": resolve("train", bins, train),
                  "self": for_population(resolve("self", bins, train), p, train), "true n(z)": true_nz}
        for label, prior in priors.items():
            under, ok = reweight(p, prior, train)
            if label == "train":
                unchanged = float(np.abs(under - p).max())
            metrics = photoz_metrics(point_estimates(under[ok], bins)["z_mean"], z[ok], under[ok], bins)
            rows.append({"sample": name, "n": int(mask.sum()), "median_z": float(np.median(z)), "prior": label,
                         "bias": metrics["bias"], "sigma_mad": metrics["sigma_mad"], "pit_ks": metrics["pit_ks"],
                         "outlier_fraction": metrics["outlier_fraction"], "crps": metrics["crps"],
                         **({"em_iterations": prior.details["em_iterations"]} if label == "self" else {})})
            print(f"{name:42s} {label:10s} bias {metrics['bias']:+.4f}  sigma_MAD {metrics['sigma_mad']:.4f}  "
                  f"PIT KS {metrics['pit_ks']:.3f}", flush=True)
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "bundle": {"path": str(args.model), "version": bundle.metadata.version, "sha256": bundle.sha256},
              "data": str(args.data), "n": len(probs), "train_prior_unchanged_max_abs": unchanged,
              "targets": {"abs_bias_max": 0.002, "pit_ks_max": 0.03}, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"priors-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    print("\n| sample | n | median z | prior | bias | sigma_MAD | PIT KS |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['sample']} | {r['n']} | {r['median_z']:.3f} | {r['prior']} | {r['bias']:+.4f} | "
              f"{r['sigma_mad']:.4f} | {r['pit_ks']:.3f} |")
    print(f"\nPDFs under the training prior unchanged: max |difference| {unchanged:.1e}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
