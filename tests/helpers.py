"""Test data shared by the suites."""
from __future__ import annotations

import numpy as np


def sky_cutouts(rng, n, ebv=None):
    """Distinct SDSS-like cutouts: sky noise plus a central source of random brightness and colour."""
    images = rng.normal(0, 0.05, (n, 5, 64, 64)).astype(np.float32)
    yy, xx = np.mgrid[:64, :64]
    for k in range(n):
        profile = np.exp(-((xx - 32) ** 2 + (yy - 32) ** 2) / (2 * rng.uniform(1.5, 6) ** 2))
        images[k] += (rng.uniform(1, 80, 5)[:, None, None] * profile).astype(np.float32)
    return images
