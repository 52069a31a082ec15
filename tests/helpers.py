"""Test data and helpers shared by the suites."""
from __future__ import annotations

import asyncio
import io

import numpy as np
from astropy.io import fits

from photoz.model.conventions import BANDS, PIXEL_SCALE_ARCSEC, sky_sigma_nmgy_per_pixel


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


# -- galaxy-like cutouts for the quality flags (numpy only) --

SIZE = 64
SIGMA = np.array([sky_sigma_nmgy_per_pixel(b) for b in BANDS], np.float32)
COLOURS = np.array([1.6, 0.6, 0.0, -0.35, -0.6])  # mag relative to r: a typical MGS galaxy


def _grid():
    c = (SIZE - 1) / 2
    y, x = np.mgrid[:SIZE, :SIZE]
    return x - c, y - c


def _psf_convolve(images: np.ndarray, psf_sigma_px: np.ndarray) -> np.ndarray:
    k = np.fft.fftfreq(SIZE)
    kx, ky = np.meshgrid(k, k)
    transfer = np.exp(-2 * np.pi**2 * (kx**2 + ky**2) * psf_sigma_px[:, None, None, None] ** 2)
    return np.real(np.fft.ifft2(np.fft.fft2(images) * transfer)).astype(np.float32)


def disk_galaxies(rng, n, r_mag=(14.6, 17.7), scale_px=(1.5, 5.0), noise=True, offset_px=0.5,
                  psf_fwhm_arcsec=(1.2, 1.6)):
    """(images (n, 5, S, S) nanomaggies, ebv (n,)) of exponential disks through a Gaussian PSF (~1.4")."""
    x, y = _grid()
    mags = rng.uniform(*r_mag, n)
    h = rng.uniform(*scale_px, n)
    q, phi = rng.uniform(0.4, 1.0, n), rng.uniform(0, np.pi, n)
    dx, dy = rng.normal(0, offset_px, (2, n))
    cos, sin = np.cos(phi)[:, None, None], np.sin(phi)[:, None, None]
    xc, yc = x[None] - dx[:, None, None], y[None] - dy[:, None, None]
    xs, ys = xc * cos + yc * sin, -xc * sin + yc * cos
    profile = np.exp(-np.hypot(xs, ys / q[:, None, None]) / h[:, None, None])
    profile /= profile.sum(axis=(1, 2), keepdims=True)
    flux = 10 ** (-0.4 * (mags[:, None] + COLOURS[None, :] - 22.5))  # (n, 5)
    images = flux[:, :, None, None] * profile[:, None]
    psf = rng.uniform(*psf_fwhm_arcsec, n) / 2.355 / PIXEL_SCALE_ARCSEC
    images = _psf_convolve(images, psf)
    if noise:
        images += rng.normal(0, 1, images.shape).astype(np.float32) * SIGMA[None, :, None, None]
    return images.astype(np.float32), rng.uniform(0.01, 0.08, n)


def star(rng, r_mag=16.0, fwhm_arcsec=1.4):
    """A point source through a Gaussian PSF, with sky noise: (1, 5, S, S)."""
    x, y = _grid()
    s = fwhm_arcsec / 2.355 / PIXEL_SCALE_ARCSEC
    psf = np.exp(-(x**2 + y**2) / (2 * s**2))
    psf /= psf.sum()
    flux = 10 ** (-0.4 * (r_mag + np.array([1.2, 0.4, 0, -0.15, -0.25]) - 22.5))
    image = flux[:, None, None] * psf[None] + rng.normal(0, 1, (5, SIZE, SIZE)) * SIGMA[:, None, None]
    return image[None].astype(np.float32)


async def until(condition, what="the condition", timeout_s=10.0, poll_s=0.0005):
    """Wait (in an event loop) for ``condition()`` to hold, polling, not for a time: a slow machine only waits
    longer; fails after ``timeout_s``."""
    for _ in range(int(timeout_s / poll_s)):
        if condition():
            return
        await asyncio.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")
