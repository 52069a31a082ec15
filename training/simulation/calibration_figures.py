"""The calibration report's figures (``python -m photoz.training.simulation.calibrate``): the simulated sample
against the real SDSS files, and a page of simulated cutouts."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from photoz.model.conventions import BANDS


def figures(sim: dict, real: dict, sizes: dict, sim_test_path, out: Path, baseline: dict,
            z_edges: tuple[float, ...]) -> list[str]:
    """The calibration report's figures: the simulated sample against the real one (``real``: n(z), r magnitudes,
    colours; ``sizes``: the DR18 sizes), medians in the redshift bins of ``z_edges``, with the kNN baseline's
    scores, and a page of simulated cutouts. Their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    ax = axes[0, 0]
    ax.hist(sim["z"], bins=40, range=(0, 0.4), density=True, histtype="step", lw=1.5, label="simulated")
    ax.hist(real["z"], bins=40, range=(0, 0.4), density=True, histtype="step", lw=1.5, label="real SDSS (r<17.77)")
    ax.set(xlabel="z", ylabel="n(z)", title="redshift distribution of the selected sample")
    ax.legend()
    ax = axes[0, 1]
    ax.hist(sim["mags"][:, 2], bins=40, range=(13, 18), density=True, histtype="step", lw=1.5, label="simulated")
    ax.hist(real["mags"][:, 2], bins=40, range=(13, 18), density=True, histtype="step", lw=1.5, label="real")
    ax.set(xlabel="model r (mag)", ylabel="density", title="r magnitudes (MGS cut: Petrosian r 17.77)")
    ax.legend()
    _colour_panels((axes[0, 2], axes[1, 0]), sim, real, z_edges)
    ax = axes[1, 1]
    ax.scatter(sim["z"][:4000], sim["r50"][:4000], s=1, alpha=0.3, label="simulated (measured)")
    ax.scatter(sizes["z"], sizes["r50"], s=2, alpha=0.5, color="k", label="real DR18 petroR50_r")
    ax.set(xlabel="z", ylabel="Petrosian R50, r (arcsec)", yscale="log", title="size against redshift", xlim=(0, 0.35))
    ax.legend(markerscale=6)
    ax = axes[1, 2]
    ax.axis("off")
    ax.text(0, 0.9, "kNN baseline on held-out simulated set", fontsize=11, weight="bold")
    for k, (key, val) in enumerate((("sigma_MAD", f"{baseline['sigma_mad']:.4f}"),
                                    ("outlier fraction", f"{baseline['outlier_fraction']:.2%}"),
                                    ("bias", f"{baseline['bias']:+.5f}"), ("CRPS", f"{baseline['crps']:.4f}"),
                                    ("PIT KS", f"{baseline['pit_ks']:.3f}"))):
        ax.text(0.05, 0.75 - 0.1 * k, f"{key}: {val}", fontsize=11)
    fig.tight_layout()
    paths.append(out / "simulation_realism.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    paths.append(_cutouts_figure(sim_test_path, out / "simulation_cutouts.png"))
    return [str(p) for p in paths]


def _colour_panels(axes, sim: dict, real: dict, z_edges: tuple[float, ...]) -> None:
    """g - r and u - g against redshift, simulated (red and blue) and real, with their medians per bin."""
    panels = [("g-r", (BANDS.index("g"), BANDS.index("r"))), ("u-g", (BANDS.index("u"), BANDS.index("g")))]
    for ax, (name, (a, b)) in zip(axes, panels, strict=True):
        for label, sel, colour in (("sim red", sim["red"].astype(bool), "tab:red"),
                                   ("sim blue", ~sim["red"].astype(bool), "tab:blue")):
            ax.scatter(sim["z"][sel][:3000], (sim["mags"][sel, a] - sim["mags"][sel, b])[:3000], s=1, alpha=0.3,
                       color=colour, label=label)
        ax.scatter(real["z"], real["mags"][:, a] - real["mags"][:, b], s=1, alpha=0.3, color="k", label="real SDSS")
        centres = 0.5 * (np.array(z_edges[:-1]) + np.array(z_edges[1:]))
        for data, style, lab in ((sim, "-", "sim median"), (real, "--", "real median")):
            med = [np.median(data["mags"][(data["z"] >= lo) & (data["z"] < hi), a]
                             - data["mags"][(data["z"] >= lo) & (data["z"] < hi), b])
                   if np.sum((data["z"] >= lo) & (data["z"] < hi)) else np.nan
                   for lo, hi in zip(z_edges[:-1], z_edges[1:], strict=True)]
            ax.plot(centres, med, style, color="orange", lw=2, label=lab)
        ax.set(xlabel="z", ylabel=name, title=f"{name} against redshift", xlim=(0, 0.35),
               ylim=(0, 2.2 if name == "g-r" else 3.2))
        ax.legend(markerscale=6, fontsize=7)


def _cutouts_figure(sim_test_path, path: Path) -> Path:
    """24 simulated cutouts as i, r, g colour images."""
    import h5py
    import matplotlib.pyplot as plt

    with h5py.File(sim_test_path) as h5:
        images, z = h5["images"][:24], h5["z"][:24]
    fig, axes = plt.subplots(4, 6, figsize=(12, 8.5))
    for ax, image, zz in zip(axes.ravel(), images, z, strict=True):
        rgb = np.stack([image[BANDS.index(b)] for b in ("i", "r", "g")], axis=-1)
        rgb = np.arcsinh(np.clip(rgb, 0, None) / 0.1) / np.arcsinh(300)
        ax.imshow(np.clip(rgb, 0, 1), origin="lower")
        ax.set_title(f"z = {zz:.3f}", fontsize=9)
        ax.axis("off")
    fig.suptitle("simulated cutouts (i, r, g as RGB, asinh stretch; 64 x 64 pixels of 0.396\")")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
