"""Priors on samples unlike the training set: bias and PIT with the training prior, prior=self and the true n(z).

    python -m benchmarks.priors --data sim-test.h5 [--reference sim-train.h5] [--model bundle.onnx] [--n 8192]

Runs the bundle over a labelled simulated data set once, then scores subsamples whose n(z) differs from the
training set's, as survey users' samples do: all of it (the training population), bright (dereddened
Petrosian r < 17), the red sequence (dereddened model u - r >= 2.22, Strateva et al. 2001) and a redshift
shell (objects kept with probability exp(-(z - 0.15)^2 / (2 x 0.03^2)), seeded). Each is scored with its PDFs
under the training prior (as the network gives them), under ``prior=self`` (the subsample's own n(z) by EM,
photoz.model.priors) and under its true n(z) (a custom histogram of its true redshifts on the model's bins).
With ``--reference`` (a labelled catalogue of the training population, such as the bundle's training file), the
samples cut on the photometry are also scored with their selection declared: its completeness C(z), the
fraction of the reference's galaxies at each z that the same cut keeps (photoz.model.priors.
completeness_histogram, on bins of COMPLETENESS_BIN_Z), sent with ``self`` and with the true n(z); and two
samples both reweighted in redshift and cut (the shell, then r < 17 or the red sequence) show the selection at
work where neither the training prior nor the sample's own n(z) is the right one.
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
from photoz.model.priors import (  # noqa: E402
    MIN_OBJECTS_SELF,
    completeness_histogram,
    for_population,
    resolve,
    reweight,
    training_nz,
)
from photoz.model.runtime import OnnxPredictor  # noqa: E402

DEFAULT_MODEL = ROOT / "model" / "bundles" / "photoz-sdss-sim.onnx"
#: The red-sequence separator in dereddened u - r (Strateva et al. 2001), mag.
RED_SEQUENCE_U_MINUS_R = 2.22
#: The redshift shell's centre and width.
SHELL_Z, SHELL_SIGMA = 0.15, 0.03
#: Width in z of the completeness histogram's bins: below the PDFs' width (sigma_MAD ~0.016 (1 + z)), and a
#: 48,000-galaxy reference holds more than 100 galaxies in each out to z ~ 0.25.
COMPLETENESS_BIN_Z = 0.01
BRIGHT, RED = "bright: r < 17", f"red sequence: u - r >= {RED_SEQUENCE_U_MINUS_R}"


def dereddened(mags: np.ndarray, ebv: np.ndarray, band: str) -> np.ndarray:
    return mags[:, BANDS.index(band)] - EXTINCTION_A_OVER_EBV[band] * ebv


def cuts(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The cuts on the photometry, as row masks: dereddened Petrosian r < 17, the red sequence."""
    ebv = data["ebv"]
    petro_r = dereddened(data["petro_mag"], ebv, "r")
    u_minus_r = dereddened(data["model_mag"], ebv, "u") - dereddened(data["model_mag"], ebv, "r")
    return {BRIGHT: petro_r < 17.0, RED: u_minus_r >= RED_SEQUENCE_U_MINUS_R}


def subsamples(data: dict[str, np.ndarray], seed: int = 0) -> dict[str, tuple[np.ndarray, str | None]]:
    """The samples scored: a row mask each, and the cut (a key of :func:`cuts`) that selected it, if any."""
    z, cut = data["z"], cuts(data)
    keep = np.random.default_rng(seed).uniform(size=z.size) < np.exp(-0.5 * ((z - SHELL_Z) / SHELL_SIGMA) ** 2)
    shell = f"redshift shell around z = {SHELL_Z}"
    return {"all (the training population)": (np.ones(z.size, bool), None), BRIGHT: (cut[BRIGHT], BRIGHT),
            RED: (cut[RED], RED), shell: (keep, None), f"{shell}, then r < 17": (keep & cut[BRIGHT], BRIGHT),
            f"{shell}, then the red sequence": (keep & cut[RED], RED)}


def read(path: Path, n: int | None, images: bool = True) -> dict[str, np.ndarray]:
    import h5py

    with h5py.File(path, "r") as h5:
        rows = slice(None, n)
        out = {"ebv": np.asarray(h5["ebv"][rows], np.float32), "z": np.asarray(h5["z"][rows], np.float64),
               "petro_mag": h5["catalogue/petro_mag"][rows], "model_mag": h5["catalogue/model_mag"][rows]}
        if images:
            out["images"] = np.asarray(h5["images"][rows], np.float32)
    return out


def selections(reference: dict[str, np.ndarray], bins) -> dict[str, dict[str, list[float]]]:
    """Each cut's completeness histogram measured on the reference catalogue (selection_edges and
    selection_completeness as a request sends them)."""
    edges = np.arange(bins.edges[0], bins.edges[-1] + COMPLETENESS_BIN_Z / 2, COMPLETENESS_BIN_Z)
    return {name: {"selection_edges": edges.tolist(),
                   "selection_completeness": completeness_histogram(reference["z"], mask, edges).tolist()}
            for name, mask in cuts(reference).items()}


def priors_for(p: np.ndarray, z: np.ndarray, bins, train: np.ndarray, selection: dict | None) -> dict:
    """The priors a sample is scored under: train, self and its true n(z); with its selection declared too."""
    truth = {"edges": bins.edges, "weights": np.histogram(z, bins.edges)[0] + 0.5}
    out = {"train": resolve("train", bins, train),
           "self": for_population(resolve("self", bins, train), p, train),
           "true n(z)": resolve("custom", bins, train, **truth)}
    if selection is not None:
        out["self + selection"] = for_population(resolve("self", bins, train, **selection), p, train)
        out["true n(z) + selection"] = resolve("custom", bins, train, **truth, **selection)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="labelled simulated HDF5 (photoz simulate)")
    parser.add_argument("--reference", type=Path, help="labelled catalogue of the training population (the "
                        "bundle's training file): the cuts' completeness, to score the cut samples with it")
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
    declared = selections(read(args.reference, None, images=False), bins) if args.reference else {}
    rows = []
    for name, (mask, cut) in subsamples(data).items():
        p, z = probs[mask], data["z"][mask]
        if len(z) < MIN_OBJECTS_SELF:
            print(f"{name}: {len(z)} objects, fewer than prior=self takes; skipped")
            continue
        for label, prior in priors_for(p, z, bins, train, declared.get(cut or "")).items():
            under, ok = reweight(p, prior, train)
            if label == "train":
                unchanged = float(np.abs(under - p).max())
            metrics = photoz_metrics(point_estimates(under[ok], bins)["z_mean"], z[ok], under[ok], bins)
            rows.append({"sample": name, "n": int(mask.sum()), "median_z": float(np.median(z)), "prior": label,
                         "bias": metrics["bias"], "sigma_mad": metrics["sigma_mad"], "pit_ks": metrics["pit_ks"],
                         "outlier_fraction": metrics["outlier_fraction"], "crps": metrics["crps"],
                         **({"em_iterations": prior.details["em_iterations"]} if "self" in label else {})})
            print(f"{name:50s} {label:22s} bias {metrics['bias']:+.4f}  sigma_MAD {metrics['sigma_mad']:.4f}  "
                  f"PIT KS {metrics['pit_ks']:.3f}", flush=True)
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "bundle": {"path": str(args.model), "version": bundle.metadata.version, "sha256": bundle.sha256},
              "data": str(args.data), "reference": str(args.reference) if args.reference else None,
              "completeness_bin_z": COMPLETENESS_BIN_Z, "n": len(probs), "train_prior_unchanged_max_abs": unchanged,
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
