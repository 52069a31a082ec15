"""Measure a bundle's out-of-distribution flags: thresholds from its training set, injected objects to catch.

``python -m photoz.training.evaluation.ood --model B.onnx --data held-out.h5 --out DIR`` takes held-out cutouts of
the training distribution and makes, from each, an object outside it of every kind the flags are for
(:data:`INJECTIONS`): E(B-V) beyond the training range, the galaxy made brighter or fainter than the
training range, a star in its place, a second galaxy blended with it, masked (zero-filled) pixels,
saturated pixels, sky noise that buries it. It reports, per kind, the share flagged by the flag meant for
it and by any out-of-distribution flag, and the share of the untouched (in-range) objects flagged:
a table on stdout and ``ood_flags.json``. ``photoz ood-thresholds`` measures a bundle's thresholds on its
training set and writes them into its metadata (:mod:`photoz.training.release.flags`).

Targets: >= 90% of injected objects flagged, <= 2% of in-range objects flagged.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from photoz.model.conventions import (
    BANDS,
    MEDIAN_SEEING_FWHM_ARCSEC,
    NANOMAGGY_ZEROPOINT_MAG,
    PIXEL_SCALE_ARCSEC,
)
from photoz.model.features import BlendNet, cutout_features, sky_background
from photoz.model.quality import FLAG_BITS, OOD_FLAGS, flag_bits_from_features, usable_thresholds
from photoz.training.fit.data import read_cutouts

#: r-band apparent magnitude range of injected stars (inside the training flux range, so that only their
#: profile can give them away) and their g - r colour range (the stellar locus, F to early M stars).
STAR_R_MAG, STAR_G_MINUS_R = (14.8, 17.5), (0.2, 1.4)
#: Saturated cores are injected into objects whose peak is this many sky sigma above the background.
SATURATION_MIN_PEAK_SIGMA = 150.0
#: Injected blends: the companion's flux over the galaxy's, and its distance, arcsec.
BLEND_FLUX_RATIO, BLEND_DISTANCE_ARCSEC = (0.5, 1.0), (1.5, 3.0)
#: The report breaks the blends down by separation in these bins, arcsec.
BLEND_SEPARATION_BINS_ARCSEC = (1.5, 2.0, 2.5, 3.0)


def _sky_sigma(images: np.ndarray) -> np.ndarray:
    """Per object and band sky sigma (N, B), as the flags measure it."""
    return sky_background(images, PIXEL_SCALE_ARCSEC)[1]


def inject_ebv(images, ebv, t, rng, features):
    return images, t["ebv_max"] * rng.uniform(1.1, 3.0, len(ebv))


def inject_bright(images, ebv, t, rng, features):
    """The whole cutout scaled so the aperture r magnitude lands 0.3-1.5 mag above the brightest training one."""
    target = t["r_mag_min"] - rng.uniform(0.3, 1.5, len(ebv))
    factor = 10 ** (-0.4 * (target - features["r_mag"]))
    return images * factor[:, None, None, None].astype(np.float32), ebv


def inject_faint(images, ebv, t, rng, features):
    """The galaxy dimmed to 0.3-1.5 mag below the faintest training one, at the same sky noise (the dimmed
    noise topped up)."""
    target = t["r_mag_max"] + rng.uniform(0.3, 1.5, len(ebv))
    f = np.clip(10 ** (-0.4 * (target - features["r_mag"])), 0, 1).astype(np.float32)
    sigma = _sky_sigma(images)
    top_up = sigma * np.sqrt(1 - f[:, None] ** 2)
    noise = rng.normal(0, 1, images.shape).astype(np.float32) * top_up[:, :, None, None].astype(np.float32)
    return images * f[:, None, None, None] + noise, ebv


def inject_star(images, ebv, t, rng, features):
    """A star (the simulator's PSF: Moffat core, Gaussian wing, shear; seeing drawn as the simulator draws it)
    on the object's sky noise, in the training set's flux range, in place of the galaxy."""
    import galsim

    from photoz.training.simulation.drawing import PSFShape, draw
    from photoz.training.simulation.instrument import InstrumentConfig

    inst = InstrumentConfig()
    n = len(ebv)
    sigma = _sky_sigma(images)
    out = rng.normal(0, 1, images.shape).astype(np.float32) * sigma[:, :, None, None].astype(np.float32)
    r_mag = rng.uniform(*STAR_R_MAG, n)
    g_r = rng.uniform(*STAR_G_MINUS_R, n)
    # colours along the stellar locus, as linear functions of g - r (Covey et al. 2007, roughly)
    colours = {"u": 1.0 + 1.3 * g_r, "g": g_r, "r": 0 * g_r, "i": -0.38 * g_r - 0.03, "z": -0.6 * g_r - 0.05}
    fwhm_r = MEDIAN_SEEING_FWHM_ARCSEC["r"] * np.exp(rng.normal(0, inst.seeing_sigma_ln, n))
    for k in range(n):
        shape = PSFShape(inst.psf_wing_fraction, inst.psf_wing_fwhm_ratio, *rng.normal(0, inst.psf_shear_sigma, 2))
        offset = rng.normal(0, inst.centring_sigma_pixels, 2) * PIXEL_SCALE_ARCSEC
        for b, band in enumerate(BANDS):
            flux = 10 ** (-0.4 * (r_mag[k] + colours[band][k] - NANOMAGGY_ZEROPOINT_MAG))
            star = galsim.DeltaFunction(flux=flux).shift(*offset)
            fwhm = fwhm_r[k] * MEDIAN_SEEING_FWHM_ARCSEC[band] / MEDIAN_SEEING_FWHM_ARCSEC["r"]
            out[k, b] += draw([star], fwhm, shape)
    return out, ebv


def inject_blend(images, ebv, t, rng, features):
    """A blend: a second copy of the galaxy, rotated 90 degrees, :data:`BLEND_FLUX_RATIO` times as bright,
    :data:`BLEND_DISTANCE_ARCSEC` away (fainter or further neighbours are in the training set)."""
    out = images.copy()
    n = len(ebv)
    distance = rng.uniform(*BLEND_DISTANCE_ARCSEC, n) / PIXEL_SCALE_ARCSEC
    angle = rng.uniform(0, 2 * np.pi, n)
    ratio = rng.uniform(*BLEND_FLUX_RATIO, n).astype(np.float32)
    for k in range(n):
        dy, dx = int(round(distance[k] * np.sin(angle[k]))), int(round(distance[k] * np.cos(angle[k])))
        companion = np.roll(np.rot90(images[k], axes=(1, 2)), (dy, dx), axis=(1, 2))
        out[k] += ratio[k] * companion
    return out, ebv, {"separation_arcsec": (distance * PIXEL_SCALE_ARCSEC, BLEND_SEPARATION_BINS_ARCSEC)}


def inject_blend_other(images, ebv, t, rng, features):
    """A blend with another galaxy of the set (not a copy: its own shape and colours), as the blend detector is
    trained on (:func:`photoz.training.simulation.companions.add_companions`), with other draws."""
    from photoz.training.simulation.companions import add_companions

    blended, distance = add_companions(images, features["r_mag"], sky_background(images, PIXEL_SCALE_ARCSEC)[0],
                                       rng)
    return blended, ebv, {"separation_arcsec": (distance, BLEND_SEPARATION_BINS_ARCSEC)}


def inject_masked(images, ebv, t, rng, features):
    """Zero-filled pixels in one band: a 2-8 pixel wide strip along a row or a column (a bad column, a chip
    gap, a cutout's edge past the frame)."""
    out = images.copy()
    n, n_bands, size, _ = images.shape
    for k in range(n):
        b, width, start = rng.integers(0, n_bands), rng.integers(2, 9), rng.integers(0, size - 8)
        if rng.random() < 0.5:
            out[k, b, start:start + width, :] = 0
        else:
            out[k, b, :, start:start + width] = 0
    return out, ebv


def bright_peaks(images: np.ndarray) -> np.ndarray:
    """Rows whose brightest band peaks above :data:`SATURATION_MIN_PEAK_SIGMA` sky sigma: the objects bright
    enough to saturate (a faint galaxy's core never does)."""
    peak = images.max(axis=(2, 3)) - np.median(images, axis=(2, 3))
    return np.flatnonzero((peak / np.maximum(_sky_sigma(images), 1e-12)).max(axis=1) > SATURATION_MIN_PEAK_SIGMA)


def inject_saturated(images, ebv, t, rng, features):
    """A saturated object: made 1.5-4 times brighter than the saturation level at its peak, clipped there with
    the excess bled along the columns as the simulator does (:func:`~photoz.training.simulation.instrument.saturate`),
    sky noise on top (made from the objects bright enough to saturate, :func:`bright_peaks`)."""
    from photoz.training.simulation.instrument import InstrumentConfig, saturate

    level = InstrumentConfig().saturation_nmgy_per_pixel
    sigma = _sky_sigma(images)
    factor = rng.uniform(1.5, 4.0, len(ebv)) * level / images.max(axis=(1, 2, 3))
    out = images * np.maximum(factor, 1.0)[:, None, None, None].astype(np.float32)
    for k in range(len(out)):
        saturate(out[k], level)
    return out + rng.normal(0, 1, out.shape).astype(np.float32) * sigma[:, :, None, None].astype(np.float32), ebv


def inject_low_snr(images, ebv, t, rng, features):
    """Extra sky noise that puts the r-band aperture signal-to-noise at 0.2-0.7 of the training minimum."""
    snr = features["snr_r"]
    target = t["snr_r_min"] * rng.uniform(0.2, 0.7, len(ebv))
    grow = np.sqrt(np.maximum((snr / target) ** 2 - 1, 0))  # added sigma over the existing one
    sigma = _sky_sigma(images)
    noise = rng.normal(0, 1, images.shape).astype(np.float32)
    return images + noise * (grow[:, None] * sigma)[:, :, None, None].astype(np.float32), ebv


def measured_flux(images: np.ndarray, features: dict[str, np.ndarray]) -> np.ndarray:
    """Rows with a positive r aperture flux (a finite magnitude), which can be scaled to a target magnitude."""
    return np.flatnonzero(np.isfinite(features["r_mag"]))


#: Injection kinds: the function that makes them and the flag meant for them (and, for some, the rows they
#: can be made from).
ELIGIBLE: dict[str, Callable[[np.ndarray, dict[str, np.ndarray]], np.ndarray]] = {
    "saturated": lambda images, features: bright_peaks(images), "brighter": measured_flux, "fainter": measured_flux,
    "blend_other": measured_flux}
INJECTIONS: dict[str, tuple[Callable, str]] = {
    "ebv_above": (inject_ebv, "ebv_above_training"),
    "brighter": (inject_bright, "r_above_training"),
    "fainter": (inject_faint, "r_below_training"),
    "star": (inject_star, "point_source"),
    "blend": (inject_blend, "blend"),
    "blend_other": (inject_blend_other, "blend"),
    "masked": (inject_masked, "masked_pixels"),
    "saturated": (inject_saturated, "saturated"),
    "low_snr": (inject_low_snr, "low_snr"),
}

OOD_MASK = int(sum(FLAG_BITS[f] for f in OOD_FLAGS))


def _shares(bits: np.ndarray) -> dict[str, float]:
    return {name: float(np.mean((bits & FLAG_BITS[name]) > 0)) for name in OOD_FLAGS}


def measure(thresholds: dict[str, float], images: np.ndarray, ebv: np.ndarray, seed: int = 0,
            blend_net: BlendNet | None = None) -> dict[str, Any]:
    """Flag rates on the in-range objects and on each injection kind made from them (``blend_net``: the
    bundle's blend detector, whose score the thresholds may test)."""
    rng = np.random.default_rng(seed)
    features = cutout_features(images, ebv, BANDS, PIXEL_SCALE_ARCSEC, blend_net)
    bits = flag_bits_from_features(features, thresholds)
    report: dict[str, Any] = {"n": len(ebv), "in_range": {"any_ood_flag": float(np.mean((bits & OOD_MASK) > 0)),
                                                          "by_flag": _shares(bits)}, "injected": {}}
    for kind, (inject, flag) in INJECTIONS.items():
        rows = ELIGIBLE[kind](images, features) if kind in ELIGIBLE else np.arange(len(ebv))
        new_images, new_ebv, *details = inject(images[rows], ebv[rows], thresholds, rng,
                                               {key: value[rows] for key, value in features.items()})
        got = flag_bits_from_features(cutout_features(new_images, new_ebv, BANDS, PIXEL_SCALE_ARCSEC, blend_net),
                                      thresholds)
        caught = (got & FLAG_BITS[flag]) > 0
        report["injected"][kind] = {"flag": flag, "n": len(new_ebv), "intended_flag": float(np.mean(caught)),
                                    "any_ood_flag": float(np.mean((got & OOD_MASK) > 0)), "by_flag": _shares(got)}
        for name, (values, edges) in (details[0] if details else {}).items():  # the intended flag's rate per bin
            report["injected"][kind][f"by_{name}"] = [
                {"lo": lo, "hi": hi, "n": int(inside.sum()), "intended_flag": float(np.mean(caught[inside]))}
                for lo, hi in zip(edges[:-1], edges[1:], strict=True)
                for inside in [(values >= lo) & (values < hi)] if inside.any()]
    lowest, in_range = min(r["any_ood_flag"] for r in report["injected"].values()), report["in_range"]["any_ood_flag"]
    report["targets"] = {"injected_flagged_min": lowest, "in_range_flagged": in_range,
                         "met": bool(lowest >= 0.90 and in_range <= 0.02)}
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{'objects':<14}{'n':>6}  {'intended flag':<22}{'flagged by it':>14}{'any OOD flag':>14}",
             f"{'in range':<14}{report['n']:>6}  {'-':<22}{'-':>14}{report['in_range']['any_ood_flag']:>14.1%}"]
    for kind, r in report["injected"].items():
        lines.append(f"{kind:<14}{r['n']:>6}  {r['flag']:<22}{r['intended_flag']:>14.1%}{r['any_ood_flag']:>14.1%}")
        for key, bins in r.items():
            if key.startswith("by_") and key != "by_flag":
                lines.append(f"{'':<14}{'':>6}  {key[3:]:<22}" + ", ".join(
                    f"{b['lo']:g}-{b['hi']:g}: {b['intended_flag']:.0%}" for b in bins))
    t = report["targets"]
    lines.append(f"targets (>= 90% injected, <= 2% in range): {'met' if t['met'] else 'NOT met'} "
                 f"(lowest injected {t['injected_flagged_min']:.1%}, in range {t['in_range_flagged']:.1%})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from photoz.model.bundle import load_bundle

    p = argparse.ArgumentParser(prog="python -m photoz.training.evaluation.ood", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="bundle (.onnx) with quality thresholds")
    p.add_argument("--data", required=True, help="held-out labelled HDF5 of the training distribution")
    p.add_argument("--n", type=int, default=2000, help="objects to use (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for ood_flags.json")
    args = p.parse_args(argv)
    bundle = load_bundle(args.model)
    thresholds = usable_thresholds(bundle.metadata.document.get("quality"))
    if thresholds is None:
        p.error(f"{args.model} has no quality thresholds of this photoz's feature version: add them with "
                "`photoz ood-thresholds`")
    images, ebv = read_cutouts(args.data, args.n)
    blend_net = BlendNet.from_quality(bundle.metadata.document.get("quality"))
    report = {"model": {"name": bundle.metadata.name, "version": bundle.metadata.version, "sha256": bundle.sha256},
              "data": str(args.data), "thresholds": thresholds,
              **measure(thresholds, images, ebv, args.seed, blend_net)}
    print(format_report(report))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ood_flags.json").write_text(json.dumps(report, indent=2))
        print(f"\n{out / 'ood_flags.json'}")
    return 0 if report["targets"]["met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
