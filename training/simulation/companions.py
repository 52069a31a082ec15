"""Blends made from real cutouts: another galaxy of the same set added close by (the blend detector's training
pairs, :mod:`photoz.training.release.blend`, and the injected blends of the flags' report,
:mod:`photoz.training.evaluation.ood`)."""
from __future__ import annotations

import numpy as np

from photoz.model.conventions import NANOMAGGY_ZEROPOINT_MAG, PIXEL_SCALE_ARCSEC

#: The companions the detector learns to see: flux relative to the galaxy's (r aperture), and distance, arcsec.
COMPANION_FLUX_RATIO, COMPANION_DISTANCE_ARCSEC = (0.5, 1.0), (1.5, 3.0)


def add_companions(images: np.ndarray, r_mag: np.ndarray, background: np.ndarray,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each cutout with another cutout of the set (sky-subtracted, shifted, scaled) added as a companion:
    (blended images, separation in arcsec). ``r_mag`` are the cutouts' aperture magnitudes (which scale the
    companions to their flux ratio; all finite), ``background`` their sky levels (N, bands)."""
    n = len(images)
    if n < 2:
        raise ValueError("companions are other cutouts of the set: at least two are needed")
    if not np.all(np.isfinite(r_mag)):
        raise ValueError("every cutout needs a positive r flux (a finite aperture magnitude) to scale companions to")
    flux = 10 ** (-0.4 * (np.asarray(r_mag, np.float64) - NANOMAGGY_ZEROPOINT_MAG))
    partner = (np.arange(n) + rng.integers(1, n, n)) % n  # never the galaxy itself
    distance = rng.uniform(*COMPANION_DISTANCE_ARCSEC, n)
    angle = rng.uniform(0, 2 * np.pi, n)
    ratio = rng.uniform(*COMPANION_FLUX_RATIO, n)
    out = np.array(images, np.float32, copy=True)
    for k in range(n):
        j = partner[k]
        shift = distance[k] / PIXEL_SCALE_ARCSEC
        dy, dx = int(round(shift * np.sin(angle[k]))), int(round(shift * np.cos(angle[k])))
        companion = images[j] - background[j][:, None, None].astype(np.float32)
        scale = np.float32(ratio[k] * flux[k] / flux[j])
        out[k] += np.roll(companion, (dy, dx), axis=(1, 2)) * scale
    return out, distance
