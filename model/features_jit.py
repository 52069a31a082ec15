"""The quality features of :mod:`photoz.model.features`, compiled with numba: one pass per cutout instead of ~100
numpy calls per batch.

The definitions are :mod:`photoz.model.features`' (that module's numpy code is the reference: training measures the
thresholds with it); this computes the same features per cutout in compiled loops, sums in float64 where the
reference sums float32 products (values agree to 1e-4 relative at worst, ~1e-6 typically;
tests/unit/test_quality.py holds them together). A server spends much of the flags' time in numpy's per-call
overhead on its small batches (~0.4 ms per call however few cutouts) and in temporaries the size of the stack;
here a cutout costs ~0.05 ms on the development machine, plus the blend detector's network (~0.065 ms), with the
GIL released. Without numba the numpy reference runs (:func:`available`).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from photoz.model.conventions import NANOMAGGY_ZEROPOINT_MAG
from photoz.model.features import (
    BLEND_ASINH_SCALE,
    BLEND_CORE_PIXELS,
    BLEND_CROP_PIXELS,
    CLIP_SIGMA,
    CLIPPED_STD,
    IDENTICAL_RUN_PIXELS,
    PLATEAU_FRACTION,
    PLATEAU_MIN_PEAK_SIGMA,
    PLATEAU_NOISE_SIGMA,
    BlendNet,
    geometry_of,
)

try:
    import numba
except ImportError:  # pragma: no cover (numba is a dependency; a trimmed install runs the numpy reference)
    numba = None  # type: ignore[assignment]


def available() -> bool:
    return numba is not None


def _jit(function: Any) -> Any:
    """Compiled at first use, cached in numba's cache (``NUMBA_CACHE_DIR``, else beside this module) where one is
    writable, else compiled anew in each process; GIL released while it runs (the event loop goes on)."""
    if numba is None:
        return function
    try:
        return numba.njit(cache=True, nogil=True)(function)
    except RuntimeError:  # no writable cache location (a read-only install without NUMBA_CACHE_DIR)
        return numba.njit(nogil=True)(function)


@_jit
def _background(sky: np.ndarray) -> tuple[float, float]:
    """Sky level and sigma of one band's sky pixels: mean and standard deviation, then 3-sigma clipped twice."""
    m = sky.size
    total = 0.0
    squares = 0.0
    for k in range(m):
        v = float(sky[k])
        total += v
        squares += v * v
    level = total / m
    sigma = math.sqrt(max(squares / m - level * level, 0.0))
    for _ in range(2):
        cut = CLIP_SIGMA * sigma
        count = 0
        shift = 0.0
        squares = 0.0
        for k in range(m):
            d = float(sky[k]) - level
            if abs(d) <= cut:
                count += 1
                shift += d
                squares += d * d
        count = max(count, 1)
        shift /= count
        level += shift
        sigma = math.sqrt(max(squares / count - shift * shift, 0.0)) / CLIPPED_STD
    return level, sigma


@_jit
def _has_run(image: np.ndarray, length: int) -> bool:
    """Whether ``image`` (S, S) holds ``length`` equal values in a row or a column: a run of 2 * stride pixels
    holds two pixels a stride apart at multiples of the stride, so only such pairs are followed up."""
    size = image.shape[0]
    stride = length // 2
    for a in range(size):
        for j in range(0, size - stride, stride):
            if image[a, j] == image[a, j + stride]:  # along row a
                lo, hi = j, j
                while lo > 0 and image[a, lo - 1] == image[a, lo]:
                    lo -= 1
                while hi < size - 1 and image[a, hi + 1] == image[a, hi]:
                    hi += 1
                if hi - lo + 1 >= length:
                    return True
            if image[j, a] == image[j + stride, a]:  # along column a
                lo, hi = j, j
                while lo > 0 and image[lo - 1, a] == image[lo, a]:
                    lo -= 1
                while hi < size - 1 and image[hi + 1, a] == image[hi, a]:
                    hi += 1
                if hi - lo + 1 >= length:
                    return True
    return False


@_jit
def _plateau(image: np.ndarray, level: float, sigma: float) -> int:
    """Pixels within the plateau tolerance of the band's peak, if the peak is bright enough (else 0)."""
    flat = image.ravel()
    top = flat.max()
    peak = float(top) - level
    if not peak > PLATEAU_MIN_PEAK_SIGMA * max(sigma, 1e-12):
        return 0
    threshold = np.float32(level + peak - max(PLATEAU_FRACTION * peak, PLATEAU_NOISE_SIGMA * sigma))
    count = 0
    for k in range(flat.size):
        if flat[k] >= threshold:
            count += 1
    return count


@_jit
def _shape(ri: np.ndarray, half: int, window: np.ndarray, core: np.ndarray, inner: np.ndarray, asym: np.ndarray,
           rotations: np.ndarray, ri_sigma: float) -> tuple[float, float]:
    """Concentration and noise-corrected asymmetry of one r+i image (S*S,) about its brightest central pixel."""
    size = int(round(math.sqrt(ri.size)))
    c = size // 2
    best, centre = -np.inf, 0
    for y in range(c - half, c + half + 1):
        for x in range(c - half, c + half + 1):
            if ri[y * size + x] > best:
                best, centre = ri[y * size + x], y * size + x
    core_sum = 0.0
    for k in core:
        core_sum += ri[centre + window[k]]
    inner_sum = 0.0
    for k in inner:
        inner_sum += ri[centre + window[k]]
    n_asym = asym.size
    total = 0.0
    for j in range(n_asym):
        total += ri[centre + window[asym[j]]]
    residual = np.inf
    for r in range(9):
        s = 0.0
        for j in range(n_asym):
            s += abs(ri[centre + window[asym[j]]] - ri[centre + rotations[r * n_asym + j]])
        residual = min(residual, s)
    noise = n_asym * 2 * ri_sigma / math.sqrt(math.pi)
    concentration = core_sum / inner_sum if inner_sum > 0 else 0.0
    asymmetry = (residual - noise) / total if total > 0 else np.inf
    return concentration, asymmetry


@_jit
def _features(images: np.ndarray, outer: np.ndarray, aperture: np.ndarray, half: int, window: np.ndarray,
              core: np.ndarray, inner: np.ndarray, asym: np.ndarray, rotations: np.ndarray, r_index: int,
              i_index: int, out: np.ndarray, identical: np.ndarray, plateau: np.ndarray, blend: np.ndarray) -> None:
    """Every feature of every cutout: ``out`` (N, 4) r_mag, snr_r, concentration, asymmetry; ``identical``,
    ``plateau`` (N,); ``blend`` (N, 1, C, C) the blend detector's input (when C > 0)."""
    n, n_bands, size, _ = images.shape
    level = np.empty(n_bands)
    sigma = np.empty(n_bands)
    ri = np.empty(size * size)
    crop = blend.shape[2]
    for i in range(n):
        image = images[i]
        found = False
        most = 0
        for b in range(n_bands):
            level[b], sigma[b] = _background(image[b].ravel()[outer])
            if not found:
                found = _has_run(image[b], IDENTICAL_RUN_PIXELS)
            most = max(most, _plateau(image[b], level[b], sigma[b]))
        identical[i], plateau[i] = found, most
        r_flat = image[r_index].ravel()
        flux = 0.0
        for k in aperture:
            flux += r_flat[k]
        flux -= aperture.size * level[r_index]
        out[i, 0] = NANOMAGGY_ZEROPOINT_MAG - 2.5 * math.log10(max(flux, 1e-30)) if flux > 0 else np.inf
        snr = flux / (sigma[r_index] * math.sqrt(aperture.size)) if sigma[r_index] > 0 else np.nan
        out[i, 1] = snr if np.isfinite(snr) else 0.0
        i_flat = image[i_index].ravel()
        sky = level[r_index] + level[i_index]
        for k in range(size * size):
            ri[k] = float(r_flat[k] + i_flat[k]) - sky  # float32 sum, as the reference adds the bands
        out[i, 2], out[i, 3] = _shape(ri, half, window, core, inner, asym, rotations,
                                      math.hypot(sigma[r_index], sigma[i_index]))
        if crop:
            _blend_input(ri, size, crop, blend[i, 0])


@_jit
def _blend_input(ri: np.ndarray, size: int, crop: int, out: np.ndarray) -> None:
    lo = (size - crop) // 2
    c = lo + (crop - BLEND_CORE_PIXELS) // 2
    core = 0.0
    for y in range(c, c + BLEND_CORE_PIXELS):
        for x in range(c, c + BLEND_CORE_PIXELS):
            core += ri[y * size + x]
    scale = float(np.float32(max(core, 1e-3)))
    for y in range(crop):
        for x in range(crop):
            out[y, x] = math.asinh(ri[(lo + y) * size + lo + x] / scale * BLEND_ASINH_SCALE)


def cutout_features(images: np.ndarray, ebv: np.ndarray, bands: tuple[str, ...], pixel_scale_arcsec: float,
                    blend_net: BlendNet | None = None) -> dict[str, np.ndarray]:
    """:func:`photoz.model.features.cutout_features`, compiled: the same dict of (N,) arrays."""
    images = np.ascontiguousarray(images, np.float32)
    n, _, size, _ = images.shape
    geo = geometry_of(size, pixel_scale_arcsec)
    st = geo.stencil
    out = np.empty((n, 4))
    identical, plateau = np.empty(n, np.bool_), np.empty(n, np.int64)
    crop = BLEND_CROP_PIXELS if blend_net is not None else 0
    blend = np.empty((n, 1, crop, crop), np.float32)
    _features(images, geo.background_pixels, geo.aperture_pixels, st.half, st.window, st.core, st.inner, st.asym,
              st.rotations, bands.index("r"), bands.index("i"), out, identical, plateau, blend)
    features = {"ebv": np.asarray(ebv, np.float64).reshape(n), "r_mag": out[:, 0], "snr_r": out[:, 1],
                "concentration": out[:, 2], "asymmetry": out[:, 3], "identical_run": identical, "plateau": plateau}
    if blend_net is not None:
        features["blend_score"] = blend_net.scores(blend)
    return features
