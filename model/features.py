"""The quality features of cutouts (numpy, no torch), from which :mod:`photoz.model.quality` sets its flags.

Features, all from the cutout (nanomaggies) and its E(B-V):

- background: 3-sigma-clipped mean and standard deviation of every other pixel beyond
  :data:`BACKGROUND_RADIUS_ARCSEC` from the centre, per band;
- ``r_mag``: background-subtracted r flux within :data:`APERTURE_RADIUS_ARCSEC` of the centre,
  as an AB magnitude (fluxes <= 0 count as infinitely faint);
- ``snr_r``: that flux over its sky noise, background sigma x sqrt(aperture pixels);
- ``concentration``: r+i flux within :data:`CORE_RADIUS_ARCSEC` of the brightest central pixel over
  the flux within :data:`INNER_RADIUS_ARCSEC` of it: how little light lies in the wings. A point source
  has nearly all its light inside 2.4" (its PSF's value, ~0.85-0.95 in SDSS seeing); a galaxy's profile
  is extended, so even a compact galaxy in good seeing has more of it outside. (A 0.8" core cannot tell a
  star in poor seeing from a compact galaxy in good seeing: it catches 89% of injected stars, the wings 96%,
  at the same share of galaxies flagged.)
- ``asymmetry``: r+i sum of |I - I rotated 180 degrees about that pixel, or a point half a pixel from it,
  whichever gives least| within
  :data:`ASYMMETRY_RADIUS_ARCSEC`, less its expectation from sky noise alone, over the summed flux
  (Conselice 2000's A, noise-corrected);
- ``identical_run``: whether any band has :data:`IDENTICAL_RUN_PIXELS` identical values in a row or column
  (real sky noise practically never repeats a float that many times);
- ``blend_score`` (bundles whose thresholds carry a blend detector): the logit of a small convolutional
  network (``blend_net`` in the metadata, ONNX, run with ONNX Runtime on one thread) that looks at the central
  :data:`BLEND_CROP_PIXELS` pixels of the r+i image, each cutout scaled by its own central flux
  (:func:`blend_input`), trained when the thresholds are measured to tell the training set's galaxies from
  the same galaxies with another training galaxy 1.5-3" away at 0.5-1 times their flux
  (``photoz.training.release.blend``): the asymmetry misses most such pairs, which are symmetric about their midpoint;
- ``plateau``: the largest number of pixels, over bands whose peak is above
  :data:`PLATEAU_MIN_PEAK_SIGMA` sky sigma, within :data:`PLATEAU_FRACTION` or :data:`PLATEAU_NOISE_SIGMA`
  sky sigma of that band's peak.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from photoz.model.conventions import NANOMAGGY_ZEROPOINT_MAG

#: Version of the feature definitions below; a bundle's thresholds apply only to the version they were measured
#: with (a bundle measured with another version gets the fixed-definition flags only).
FEATURES_VERSION = 3


#: Radius of the r-band photometry aperture, arcsec.
APERTURE_RADIUS_ARCSEC = 6.0


#: Pixels beyond this radius from the centre measure the background (median) and sky noise (MAD), arcsec.
BACKGROUND_RADIUS_ARCSEC = 10.0


#: Core and inner radii of the concentration index, arcsec.
CORE_RADIUS_ARCSEC, INNER_RADIUS_ARCSEC = 2.4, 3.2


#: Radius within which the asymmetry is summed, arcsec.
ASYMMETRY_RADIUS_ARCSEC = 4.0


#: Half-size of the central box in which the object's brightest pixel is looked for, arcsec.
CENTRE_SEARCH_ARCSEC = 1.2


#: Sky pixels further than this many sigma from the sky level are clipped, twice; the clipped standard deviation
#: of a Gaussian is CLIPPED_STD of its sigma.
CLIP_SIGMA, CLIPPED_STD = 3.0, 0.9866


#: Cutouts per block of feature work.
BLOCK = 16


#: Identical consecutive pixel values that mark masked or filled pixels.
IDENTICAL_RUN_PIXELS = 8


#: A band's peak must exceed this many sky sigma for its plateau to be counted.
PLATEAU_MIN_PEAK_SIGMA = 100.0


#: Pixels within this fraction of a band's peak, or this many sky sigma of it, count as its plateau.
PLATEAU_FRACTION, PLATEAU_NOISE_SIGMA = 0.02, 4.0


#: The blend detector's input: the central BLEND_CROP_PIXELS of the r+i image, divided by the flux in its central
#: BLEND_CORE_PIXELS, through asinh(BLEND_ASINH_SCALE x) (bright and faint galaxies alike).
BLEND_CROP_PIXELS, BLEND_CORE_PIXELS, BLEND_ASINH_SCALE = 32, 16, 50.0


@dataclass(frozen=True)
class _Geometry:
    """Pixel masks of the feature apertures for one cutout size and pixel scale, computed once (:func:`_geometry`:
    the flags of every batch reuse them; read-only arrays)."""

    size: int
    pixel_scale_arcsec: float

    def radius_pixels(self, arcsec: float) -> float:
        return arcsec / self.pixel_scale_arcsec

    @cached_property
    def centre_distance(self) -> np.ndarray:
        c = (self.size - 1) / 2
        y, x = np.mgrid[: self.size, : self.size]
        return _read_only(np.hypot(x - c, y - c))

    @cached_property
    def aperture(self) -> np.ndarray:
        """The r-band photometry aperture (S, S) bool."""
        return _read_only(self.centre_distance <= self.radius_pixels(APERTURE_RADIUS_ARCSEC))

    @cached_property
    def background_pixels(self) -> np.ndarray:
        """Flat indices of every other pixel beyond :data:`BACKGROUND_RADIUS_ARCSEC` from the centre."""
        return _read_only(np.flatnonzero(self.centre_distance.ravel() >
                                         self.radius_pixels(BACKGROUND_RADIUS_ARCSEC))[::2])

    @cached_property
    def aperture_pixels(self) -> np.ndarray:
        """Flat indices of the photometry aperture's pixels, in row-major order."""
        return _read_only(np.flatnonzero(self.aperture.ravel()))

    @cached_property
    def stencil(self) -> _Stencil:
        """The shape features' pixel offsets around the brightest central pixel (see :func:`_shape_features`)."""
        c = self.size // 2
        half = max(1, int(round(self.radius_pixels(CENTRE_SEARCH_ARCSEC))))
        radius = int(np.ceil(max(self.radius_pixels(INNER_RADIUS_ARCSEC),
                                 self.radius_pixels(ASYMMETRY_RADIUS_ARCSEC))))
        (dy, dx), dist = _window(min(radius, c - half - 2))
        asym = np.flatnonzero(dist <= self.radius_pixels(ASYMMETRY_RADIUS_ARCSEC))
        # the nine rotations: the centre at (py + sy/2, px + sx/2) maps pixel offset d to s - d
        shifts = np.array([(sy, sx) for sy in (-1, 0, 1) for sx in (-1, 0, 1)])  # (9, 2)
        rotations = (shifts[:, 0, None] - dy[asym]) * self.size + shifts[:, 1, None] - dx[asym]  # (9, A)
        return _Stencil(half, _read_only(dy * self.size + dx),
                        _read_only(np.flatnonzero(dist <= self.radius_pixels(CORE_RADIUS_ARCSEC))),
                        _read_only(np.flatnonzero(dist <= self.radius_pixels(INNER_RADIUS_ARCSEC))),
                        _read_only(asym), _read_only(rotations.ravel()))


@dataclass(frozen=True)
class _Stencil:
    """Flat pixel offsets for the shape features: the centre search box's half-width, the window around the
    centre, the core's, inner region's and asymmetry region's positions in that window, and the nine rotations'
    offsets of the asymmetry region's pixels, (9 * A,)."""

    half: int
    window: np.ndarray
    core: np.ndarray
    inner: np.ndarray
    asym: np.ndarray
    rotations: np.ndarray


@functools.lru_cache(maxsize=16)
def _geometry(size: int, pixel_scale_arcsec: float) -> _Geometry:
    return _Geometry(size, pixel_scale_arcsec)


def geometry_of(size: int, pixel_scale_arcsec: float) -> _Geometry:
    """The feature apertures' pixels for one cutout size and pixel scale (computed once; read-only arrays)."""
    return _geometry(size, pixel_scale_arcsec)


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


@functools.lru_cache(maxsize=16)
def _window(radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (dy, dx) of the pixels within ``radius`` of a pixel, and their distances (read-only)."""
    dy, dx = np.mgrid[-radius: radius + 1, -radius: radius + 1]
    return _read_only(np.stack([dy.ravel(), dx.ravel()])), _read_only(np.hypot(dy, dx).ravel())


def cutout_features(images: np.ndarray, ebv: np.ndarray, bands: tuple[str, ...],
                    pixel_scale_arcsec: float, blend_net: BlendNet | None = None) -> dict[str, np.ndarray]:
    """The quality features of each cutout: a dict of (N,) arrays (see the module docstring).

    ``images`` is (N, bands, S, S) in nanomaggies, ``ebv`` (N,) in magnitudes. Worked in blocks of
    :data:`BLOCK` cutouts, which stay in the CPU's cache; with ``blend_net``, ``blend_score`` too.
    """
    images = np.asarray(images, np.float32)
    ebv = np.asarray(ebv, np.float64).reshape(len(images))
    if len(images) > BLOCK:
        parts = [cutout_features(images[i:i + BLOCK], ebv[i:i + BLOCK], bands, pixel_scale_arcsec, blend_net)
                 for i in range(0, len(images), BLOCK)]
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    n, _, size, _ = images.shape
    geo = _geometry(size, pixel_scale_arcsec)
    r_index, i_index = bands.index("r"), bands.index("i")
    background, sigma = _background(images.reshape(n, len(bands), -1), geo.background_pixels)

    aperture = geo.aperture_pixels
    flux_r = images[:, r_index].reshape(n, -1)[:, aperture].sum(axis=1, dtype=np.float64) \
        - len(aperture) * background[:, r_index]
    with np.errstate(divide="ignore", invalid="ignore"):
        r_mag = np.where(flux_r > 0, NANOMAGGY_ZEROPOINT_MAG - 2.5 * np.log10(np.maximum(flux_r, 1e-30)), np.inf)
        snr_r = flux_r / (sigma[:, r_index] * np.sqrt(len(aperture)))
    snr_r = np.where(np.isfinite(snr_r), snr_r, 0.0)

    ri = images[:, r_index] + images[:, i_index] - (background[:, r_index] + background[:, i_index])[:, None, None]
    ri_sigma = np.hypot(sigma[:, r_index], sigma[:, i_index])
    concentration, asymmetry = _shape_features(ri, ri_sigma, geo)
    features = {"ebv": ebv, "r_mag": r_mag, "snr_r": snr_r,
                "concentration": concentration, "asymmetry": asymmetry,
                "identical_run": _identical_runs(images), "plateau": _plateau(images, background, sigma)}
    if blend_net is not None:
        features["blend_score"] = blend_net.scores(_blend_input(ri))
    return features


def blend_input(images: np.ndarray, bands: tuple[str, ...], pixel_scale_arcsec: float,
                level: np.ndarray | None = None) -> np.ndarray:
    """The blend detector's input for cutouts (N, bands, S, S): (N, 1, BLEND_CROP_PIXELS, BLEND_CROP_PIXELS).
    ``level``: their sky levels (N, bands) if already measured (:func:`sky_background`)."""
    if level is None:
        level = sky_background(images, pixel_scale_arcsec)[0]
    r, i = bands.index("r"), bands.index("i")
    images = np.asarray(images, np.float32)
    return _blend_input(images[:, r] + images[:, i] - (level[:, r] + level[:, i])[:, None, None])


def _blend_input(ri: np.ndarray) -> np.ndarray:
    """From sky-subtracted r+i images (N, S, S): the central crop over its central flux, through asinh."""
    size = ri.shape[-1]
    lo = (size - BLEND_CROP_PIXELS) // 2
    crop = ri[:, lo:lo + BLEND_CROP_PIXELS, lo:lo + BLEND_CROP_PIXELS]
    c = (BLEND_CROP_PIXELS - BLEND_CORE_PIXELS) // 2
    core = np.maximum(crop[:, c:c + BLEND_CORE_PIXELS, c:c + BLEND_CORE_PIXELS].sum(axis=(1, 2), dtype=np.float64),
                      1e-3)
    x = np.arcsinh(crop / core[:, None, None].astype(np.float32) * np.float32(BLEND_ASINH_SCALE))
    return np.ascontiguousarray(x[:, None], dtype=np.float32)


class BlendNet:
    """The blend detector of a bundle's thresholds: an ONNX graph (bytes) from ``blend_input`` (N, 1, C, C) to
    logits (N,), run with ONNX Runtime on one thread (it runs beside the model's own sessions)."""

    def __init__(self, onnx_bytes: bytes) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    @classmethod
    def from_quality(cls, quality: Mapping[str, Any] | None) -> BlendNet | None:
        """The detector stored in a bundle's ``quality`` metadata (base64 ONNX), if it has one of this version."""
        import base64

        if not quality or quality.get("features_version") != FEATURES_VERSION or "blend_net" not in quality:
            return None
        return cls(base64.b64decode(quality["blend_net"]["onnx_base64"]))

    def scores(self, x: np.ndarray) -> np.ndarray:
        if len(x) == 0:
            return np.zeros(0)
        return np.asarray(self.session.run(None, {self.input: x})[0], np.float64).reshape(len(x))


def sky_background(images: np.ndarray, pixel_scale_arcsec: float) -> tuple[np.ndarray, np.ndarray]:
    """Sky level and sigma (N, B) of each band of cutouts (N, B, S, S), nanomaggies per pixel: the clipped
    estimate the features use (every other pixel beyond :data:`BACKGROUND_RADIUS_ARCSEC`)."""
    images = np.asarray(images, np.float32)
    n, n_bands, size, _ = images.shape
    return _background(images.reshape(n, n_bands, -1), _geometry(size, pixel_scale_arcsec).background_pixels)


def _background(flat: np.ndarray, outer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sky level and sigma of each band of ``flat`` (N, B, S*S) from the pixels at the indices ``outer``,
    3-sigma clipped twice: (N, B) each.

    Sums only, no sorting: a median over ~2,400 pixels per band would cost as much as the rest together.
    """
    sky = np.take(flat, outer, axis=2)  # every other pixel of the region (``outer`` comes thinned): the cost
    m = sky.shape[2]                     # halves, the sky level's error grows by sqrt(2), to ~3% of a pixel's sigma
    # sums over the pixels as float32 products with ones (BLAS; ~1e-7 relative here): numpy's reductions along
    # an axis cost several times more for a few cutouts, which is what a server's batches hold
    ones = np.ones(m, np.float32)
    level = (sky @ ones) / np.float32(m)
    sigma = np.sqrt(np.maximum(np.einsum("nbk,nbk->nb", sky, sky) / np.float32(m) - level**2, 0))
    for _ in range(2):
        deviation = sky - level[:, :, None]
        keep = np.abs(deviation) <= np.float32(CLIP_SIGMA) * sigma[:, :, None]
        kept = np.where(keep, deviation, np.float32(0))
        count = np.maximum(np.count_nonzero(keep, axis=2).astype(np.float32), 1)
        shift = (kept @ ones) / count
        level = level + shift
        variance = np.einsum("nbk,nbk->nb", kept, kept) / count - shift**2
        sigma = np.sqrt(np.maximum(variance, 0)) / np.float32(CLIPPED_STD)
    return level.astype(np.float64), sigma.astype(np.float64)


def _shape_features(ri: np.ndarray, ri_sigma: np.ndarray, geo: _Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Concentration and noise-corrected asymmetry of r+i images (N, S, S) about their brightest central pixel.

    The asymmetry is the smallest over the nine rotation centres within half a pixel of that pixel (a
    rotation about a half-integer point maps pixels onto pixels): a symmetric galaxy whose centre falls
    between pixels is not mistaken for an asymmetric one. The pixels are gathered by flat offsets from the
    geometry's stencil, computed once.
    """
    n, size, _ = ri.shape
    c, st = size // 2, geo.stencil
    half = st.half
    box = ri[:, c - half: c + half + 1, c - half: c + half + 1].reshape(n, -1)
    peak = np.argmax(box, axis=1)
    centre = (c - half + peak // (2 * half + 1)) * size + c - half + peak % (2 * half + 1)  # (N,) flat index
    flat = np.ascontiguousarray(ri).reshape(n, -1)
    stamp = np.take_along_axis(flat, centre[:, None] + st.window[None], axis=1)  # (N, window)
    core = stamp[:, st.core].sum(axis=1, dtype=np.float64)
    inner = stamp[:, st.inner].sum(axis=1, dtype=np.float64)
    stamp = stamp[:, st.asym]
    total = stamp.sum(axis=1, dtype=np.float64)
    rotated = np.take_along_axis(flat, centre[:, None] + st.rotations[None], axis=1).reshape(n, 9, -1)
    residual = np.abs(stamp[:, None, :] - rotated).sum(axis=2, dtype=np.float64).min(axis=1)
    # E|X - Y| for independent X, Y ~ N(0, s^2) is 2 s / sqrt(pi)
    noise = len(st.asym) * 2 * ri_sigma / np.sqrt(np.pi)
    with np.errstate(divide="ignore", invalid="ignore"):
        concentration = np.where(inner > 0, core / inner, 0.0)
        asymmetry = np.where(total > 0, (residual - noise) / total, np.inf)
    return concentration, asymmetry


def _identical_runs(images: np.ndarray) -> np.ndarray:
    """Whether any band of each cutout holds :data:`IDENTICAL_RUN_PIXELS` equal values in a row or a column."""
    n = images.shape[0]
    found = np.zeros(n, bool)
    stride = IDENTICAL_RUN_PIXELS // 2
    for along_columns in (False, True):
        # a run of 2 * stride equal pixels holds two pixels a stride apart at multiples of the stride: only cutouts
        # with such a pair (real sky noise has practically none) are checked pixel by pixel (a quarter of the cost)
        sub = images[:, :, ::stride, :] if along_columns else images[..., ::stride]
        pairs = sub[:, :, 1:, :] == sub[:, :, :-1, :] if along_columns else sub[..., 1:] == sub[..., :-1]
        candidates = np.flatnonzero(pairs.reshape(n, -1).any(axis=1))
        if candidates.size:
            part = images[candidates]
            # run[..., k]: pixels k and k+1 of a row (or a column) are equal; compared in memory order either way
            run = part[:, :, 1:, :] == part[:, :, :-1, :] if along_columns else part[..., 1:] == part[..., :-1]
            found[candidates] |= _has_run(np.swapaxes(run, 2, 3) if along_columns else run)
    return found


def _has_run(run: np.ndarray) -> np.ndarray:
    """Per cutout, whether ``run`` (equal neighbouring pairs along the last axis) holds IDENTICAL_RUN_PIXELS - 1
    equal pairs in a row."""
    length = 1  # run[k] says: the pairs k .. k + length - 1 are all equal
    while length < IDENTICAL_RUN_PIXELS - 1:  # doubling: runs of 1, 2, 4, ... equal pairs
        step = min(length, IDENTICAL_RUN_PIXELS - 1 - length)
        run = run[..., : run.shape[-1] - step] & run[..., step:]
        length += step
    return np.asarray(run.reshape(len(run), -1).any(axis=1))


def _plateau(images: np.ndarray, background: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """The largest count, over bands with a peak above PLATEAU_MIN_PEAK_SIGMA sky sigma, of pixels within
    PLATEAU_FRACTION of the peak or PLATEAU_NOISE_SIGMA sky sigma of it, whichever is more (a flat top
    under noise reaches its maximum only in its luckiest pixel). Pixels are counted in the bright bands only."""
    n, n_bands = images.shape[:2]
    peak = images.max(axis=(2, 3)) - background  # (N, B)
    bright = np.flatnonzero(peak > PLATEAU_MIN_PEAK_SIGMA * np.maximum(sigma, 1e-12))  # flat (N * B) indices
    level = (background + peak - np.maximum(PLATEAU_FRACTION * peak, PLATEAU_NOISE_SIGMA * sigma)).ravel()
    counts = np.zeros(n * n_bands, np.int64)
    if bright.size:
        flat = images.reshape(n * n_bands, -1)[bright]
        counts[bright] = np.count_nonzero(flat >= level[bright, None].astype(np.float32), axis=1)
    return counts.reshape(n, n_bands).max(axis=1)
