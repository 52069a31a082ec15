"""Test data shared by the suites."""
from __future__ import annotations

import io

import numpy as np
from astropy.io import fits


def sky_cutouts(rng, n, ebv=None):
    """Distinct SDSS-like cutouts: sky noise plus a central source of random brightness and colour."""
    images = rng.normal(0, 0.05, (n, 5, 64, 64)).astype(np.float32)
    yy, xx = np.mgrid[:64, :64]
    for k in range(n):
        profile = np.exp(-((xx - 32) ** 2 + (yy - 32) ** 2) / (2 * rng.uniform(1.5, 6) ** 2))
        images[k] += (rng.uniform(1, 80, 5)[:, None, None] * profile).astype(np.float32)
    return images


def npy_bytes(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def fits_bytes(hdus) -> bytes:
    buffer = io.BytesIO()
    fits.HDUList(hdus).writeto(buffer)
    return buffer.getvalue()
