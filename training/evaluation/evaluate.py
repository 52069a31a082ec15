"""``photoz evaluate``: score a bundle or checkpoint on a labelled data set.

Metrics (sigma_MAD, outlier fraction, bias, CRPS, PIT flatness) overall and
in bins of redshift and r magnitude, the figures astronomers look at, and the
kNN catalogue baseline scored on the very same objects, side by side.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from photoz.model.conventions import BANDS
from photoz.model.pdf import RedshiftBins, photoz_metrics, pit, point_estimates

Z_BIN_EDGES = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4)
R_MAG_BIN_EDGES = (10.0, 15.5, 16.5, 17.0, 17.5, 18.0)
#: The point estimate every headline metric uses (the PDF mean, as in Pasquet et al. 2019).
POINT_ESTIMATE = "z_mean"


def predict_file(model_path: str | Path, data_path: str | Path, batch_size: int = 128,
                 rows: np.ndarray | None = None):
    """PDFs for every object (or ``rows``, sorted) of an HDF5 data set, from a bundle (.onnx) or checkpoint (.pt)."""
    import h5py

    model_path = Path(model_path)
    if model_path.suffix == ".onnx":
        from photoz.model.bundle import load_bundle
        from photoz.model.runtime import OnnxPredictor

        predictor = OnnxPredictor(load_bundle(model_path), providers="cpu")
        bins, run = predictor.metadata.bins, predictor.predict
    else:
        import torch

        from photoz.training.fit.checkpoints import load_checkpoint

        net, state = load_checkpoint(model_path)
        bins = RedshiftBins.from_metadata(state["train_config"]["z_bins"])

        def run(images, ebv):
            with torch.no_grad():
                return net(torch.from_numpy(images), torch.from_numpy(ebv.reshape(-1, 1))).numpy()

    pdfs = []
    with h5py.File(data_path, "r") as h5:
        n = h5["images"].shape[0]
        ebv_all = np.asarray(h5["ebv"][:], np.float32) if "ebv" in h5 else np.zeros(n, np.float32)
        rows = np.arange(n) if rows is None else np.asarray(rows)
        for start in range(0, rows.size, batch_size):
            take = rows[start:start + batch_size]
            images = np.asarray(h5["images"][take], np.float32)  # h5py reads sorted index lists
            if images.shape[1] != len(BANDS):
                images = np.moveaxis(images, -1, 1)
            pdfs.append(run(images, ebv_all[take]))
    return np.concatenate(pdfs), bins


def binned_metrics(z_phot, z_spec, pdfs, bins, values, edges) -> list[dict]:
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (values >= lo) & (values < hi)
        if sel.sum() >= 10:
            rows.append({"lo": lo, "hi": hi, **photoz_metrics(z_phot[sel], z_spec[sel], pdfs[sel], bins)})
    return rows


def score(pdfs, bins: RedshiftBins, z_spec, r_mag=None) -> dict:
    z_phot = point_estimates(pdfs, bins)[POINT_ESTIMATE]
    out = {"point_estimate": POINT_ESTIMATE, **photoz_metrics(z_phot, z_spec, pdfs, bins),
           "by_redshift": binned_metrics(z_phot, z_spec, pdfs, bins, z_spec, Z_BIN_EDGES),
           # what a user of the photo-z sees: the error as a function of the estimate, not of the truth
           "by_photometric_redshift": binned_metrics(z_phot, z_spec, pdfs, bins, z_phot, Z_BIN_EDGES)}
    if r_mag is not None:
        out["by_r_magnitude"] = binned_metrics(z_phot, z_spec, pdfs, bins, r_mag, R_MAG_BIN_EDGES)
    return out


def evaluate(model_path, data_path, out_dir, baseline_train=None, figures: bool = True,
             split: str | None = None) -> dict:
    """Score the model (and the kNN baseline when ``baseline_train`` has a catalogue); write JSON + figures.

    ``split`` (train, validation, test) scores only those rows of a file with a ``split`` dataset; the
    baseline is then fitted on the train rows of ``baseline_train`` (never on the rows scored).
    """
    from photoz.training.fit.data import read_labels, split_rows

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = None
    if split is not None:
        rows = split_rows(data_path, split)
        if rows is None or rows.size == 0:
            raise ValueError(f"{data_path}: no rows in split {split!r} (the file needs a split dataset)")
    pdfs, bins = predict_file(model_path, data_path, rows=rows)
    labels = read_labels(data_path, rows)
    z = labels["z"]
    mags = labels.get("catalogue/petro_mag")
    r_mag = mags[:, BANDS.index("r")] if mags is not None else None
    report = {"model": str(model_path), "data": str(data_path), "split": split or "all rows", "n": int(z.size),
              "model_metrics": score(pdfs, bins, z, r_mag)}
    results = {"CNN": pdfs}
    if baseline_train is not None and mags is not None:
        results.update(_baselines(report, labels, baseline_train, bins, split))
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2))
    if figures:
        report["figures"] = make_figures(results, bins, z, out_dir)
        (out_dir / "metrics.json").write_text(json.dumps(report, indent=2))
    return report


def _baselines(report: dict[str, Any], labels: dict, baseline_train, bins, split: str | None) -> dict[str, Any]:
    """The catalogue baselines fitted on ``baseline_train`` and scored on ``labels`` (into ``report``): the kNN on
    Petrosian magnitudes, the literature's strong ones, and on simulations the noise-free reference. Their PDFs."""
    from photoz.model.conventions import dereddened
    from photoz.training.baselines import KNNPhotoZ, LocalLinearPhotoZ
    from photoz.training.fit.data import read_labels, split_rows

    z, mags = labels["z"], labels["catalogue/petro_mag"]
    r_mag = mags[:, BANDS.index("r")]
    train = read_labels(baseline_train, split_rows(baseline_train, "train") if split is not None else None)
    knn = KNNPhotoZ(bins=bins).fit(train["catalogue/petro_mag"], train["z"])
    results = {"kNN baseline": knn.predict_pdfs(mags)}
    report["baseline"] = {"name": f"kNN (k={knn.k}) on Petrosian r + 4 colours",
                          "trained_on": str(baseline_train), "metrics": score(results["kNN baseline"], bins, z, r_mag)}
    # the literature's catalogue baseline (Beck et al. 2016): dereddened magnitudes, model ones when the
    # catalogue has them; kNN and local linear regression
    kind, train_mags = strong_baseline_magnitudes(train)
    _, test_mags = strong_baseline_magnitudes(labels)
    strong: list[dict[str, Any]] = []
    report["strong_baselines"] = strong
    for method in (KNNPhotoZ(bins=bins), LocalLinearPhotoZ(bins=bins)):
        method_pdfs = method.fit(train_mags, train["z"]).predict_pdfs(test_mags)
        name = f"{type(method).__name__.removesuffix('PhotoZ')} (k={method.k}) on {kind}"
        strong.append({"name": name, "method": type(method).__name__, "trained_on": str(baseline_train),
                       "metrics": score(method_pdfs, bins, z, r_mag)})
        results[name] = method_pdfs
    if "truth/mag_true" in labels and "truth/mag_true" in train:
        # simulations only: the same kNN on the noise-free magnitudes, what the colours could give without
        # photometric noise; no method on these pixels can be expected below it through colours alone
        ceiling = KNNPhotoZ(bins=bins).fit(dereddened(train["truth/mag_true"], ebv=train["ebv"]), train["z"])
        report["noise_free_ceiling"] = {
            "name": f"kNN (k={ceiling.k}) on noise-free dereddened r + 4 colours (simulation truth)",
            "trained_on": str(baseline_train),
            "metrics": score(ceiling.predict_pdfs(dereddened(labels["truth/mag_true"], ebv=labels["ebv"])), bins,
                             z, r_mag)}
    return results


def strong_baseline_magnitudes(labels: dict[str, np.ndarray]) -> tuple[str, np.ndarray]:
    """The magnitudes of the strong baseline, and what they are: dereddened model magnitudes when the
    catalogue has them (with its own extinction per band, else E(B-V) x A/E(B-V)), else dereddened Petrosian."""
    from photoz.model.conventions import dereddened

    key = "catalogue/model_mag" if "catalogue/model_mag" in labels else "catalogue/petro_mag"
    extinction = labels.get("catalogue/extinction_mag")
    mags = dereddened(labels[key], extinction, None if extinction is not None else labels["ebv"])
    kind = "model" if key.endswith("model_mag") else "Petrosian"
    return f"dereddened {kind} r + 4 colours", mags


def make_figures(results: dict, bins: RedshiftBins, z_spec, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(len(names), 3, figsize=(13, 4 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        pdfs = results[name]
        z_phot = point_estimates(pdfs, bins)[POINT_ESTIMATE]
        dz = (z_phot - z_spec) / (1 + z_spec)
        ax = axes[row, 0]
        ax.hexbin(z_spec, z_phot, gridsize=60, extent=(0, 0.4, 0, 0.4), bins="log", cmap="viridis", mincnt=1)
        ax.plot([0, 0.4], [0, 0.4], "w--", lw=0.8)
        ax.set(xlabel="spectroscopic z", ylabel="photometric z (PDF mean)", title=f"{name}: photo-z vs spec-z")
        ax = axes[row, 1]
        ax.scatter(z_spec, dz, s=1, alpha=0.3)
        ax.axhline(0, color="k", lw=0.8)
        for s in (-0.05, 0.05):
            ax.axhline(s, color="r", lw=0.6, ls=":")
        ax.set(xlabel="spectroscopic z", ylabel="dz = (zp - zs)/(1 + zs)", ylim=(-0.15, 0.15), title="residuals")
        ax = axes[row, 2]
        ax.hist(pit(pdfs, bins, z_spec), bins=20, range=(0, 1), density=True, histtype="stepfilled", alpha=0.6)
        ax.axhline(1, color="k", lw=0.8)
        ax.set(xlabel="PIT", ylabel="density", title="PIT histogram (flat = calibrated)")
    fig.tight_layout()
    paths = [out_dir / "photoz_diagnostics.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(z_spec, bins=list(bins.edges), density=True, histtype="step", color="k", lw=1.5, label="true n(z)")
    for name in names:
        stacked = results[name].sum(axis=0) / (results[name].sum() * bins.widths)
        ax.step(bins.edges[:-1], stacked, where="post", label=f"stacked PDFs: {name}")
    ax.set(xlabel="z", ylabel="n(z)", title="stacked PDFs against the true redshift distribution")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "stacked_nz.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return [str(p) for p in paths]


def format_report(report: dict) -> str:
    rows = [("CNN", report["model_metrics"])]
    if "baseline" in report:
        rows.append(("kNN, Petrosian as observed", report["baseline"]["metrics"]))
    rows += [(b["name"].replace(" r + 4 colours", ""), b["metrics"]) for b in report.get("strong_baselines", [])]
    if "noise_free_ceiling" in report:
        rows.append(("(reference) kNN, noise-free magnitudes", report["noise_free_ceiling"]["metrics"]))
    width = max(len(name) for name, _ in rows) + 2
    lines = [f"{'':{width}}{'sigma_MAD':>11}{'outliers':>10}{'bias':>10}{'CRPS':>9}{'PIT KS':>9}{'n':>8}"]
    for name, m in rows:
        lines.append(f"{name:{width}}{m['sigma_mad']:>11.4f}{m['outlier_fraction']:>10.2%}{m['bias']:>+10.4f}"
                     f"{m['crps']:>9.4f}{m['pit_ks']:>9.3f}{m['n']:>8}")
    for binning, label in (("by_redshift", "z"), ("by_photometric_redshift", "z_phot")):
        lines.append(f"\nby {label} (CNN):")
        for b in report["model_metrics"].get(binning, []):
            lines.append(f"  {b['lo']:.2f} <= {label} < {b['hi']:.2f}: sigma_MAD {b['sigma_mad']:.4f}  "
                         f"outliers {b['outlier_fraction']:.2%}  bias {b['bias']:+.4f}  PIT KS "
                         f"{b.get('pit_ks', float('nan')):.3f}  n {b['n']}")
    return "\n".join(lines)
