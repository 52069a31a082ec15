"""Per-object quality and out-of-distribution flags, measured on the cutouts themselves (numpy, no torch).

The network answers for every cutout, including ones unlike anything it was
trained on. These flags say when an answer should not be trusted:

==================  ===  =================================================================================
flag                bit  set when
==================  ===  =================================================================================
pdf_at_grid_edge    0    >= 10% of the PDF in the grid's top 5 bins (the redshift may lie beyond the grid)
ebv_above_training  1    E(B-V) above the training set's range
r_above_training    2    r-band aperture flux brighter than the training set's range
r_below_training    3    r-band aperture flux fainter than the training set's range
point_source        4    light more concentrated than any training galaxy's (a star or a quasar)
blend               5    a close, comparably bright companion: the blend detector's score, or asymmetric light
masked_pixels       6    a run of identical pixel values (zero-filled, masked or off-chip pixels)
saturated           7    a flat-topped bright peak (saturated pixels)
low_snr             8    r-band aperture signal-to-noise below the training set's range
==================  ===  =================================================================================

The data-driven thresholds (bits 1-5 and 8) are quantiles of the features on
the training set, measured by :func:`reference_thresholds` when a bundle is
exported and stored in its metadata under ``quality``; ``masked_pixels`` and
``saturated`` have fixed definitions (:data:`IDENTICAL_RUN_PIXELS`, the
plateau test) with the training set's own maximum as a floor. A bundle
without thresholds gets the PDF, masked-pixel and saturation flags only.

Features, all from the cutout (nanomaggies) and its E(B-V):

- background: 3-sigma-clipped mean and standard deviation of every other pixel beyond
  :data:`BACKGROUND_RADIUS_ARCSEC` from the centre, per band;
- ``r_mag``: background-subtracted r flux within :data:`APERTURE_RADIUS_ARCSEC` of the centre,
  as an AB magnitude (fluxes <= 0 count as infinitely faint);
- ``snr_r``: that flux over its sky noise, background sigma x sqrt(aperture pixels);
- ``concentration``: r+i flux within :data:`CORE_RADIUS_ARCSEC` of the brightest central pixel over
  the flux within :data:`INNER_RADIUS_ARCSEC` of it: how little light lies in the wings. A point source
  has nearly all its light inside 2.4" (its PSF's value, ~0.85-0.95 in SDSS seeing); a galaxy's profile
  is extended, so even a compact galaxy in good seeing has more of it outside. (Features version 1 used a
  0.8" core, which cannot tell a star in poor seeing from a compact galaxy in good seeing: 89% of injected
  stars were caught, against 96% with the wings at the same share of galaxies flagged.)
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
from photoz.model.pdf import GRID_EDGE_FLAG, at_grid_edge

#: Version of the feature definitions below; a bundle's thresholds apply only to the version they were measured
#: with (a bundle measured with another version gets the fixed-definition flags only).
FEATURES_VERSION = 3

#: Flag names by bit, in bit order (bit k is ``1 << k``).
FLAG_NAMES: tuple[str, ...] = (GRID_EDGE_FLAG, "ebv_above_training", "r_above_training", "r_below_training",
                               "point_source", "blend", "masked_pixels", "saturated", "low_snr")
FLAG_BITS: dict[str, int] = {name: 1 << k for k, name in enumerate(FLAG_NAMES)}
#: The flags that say an object lies outside what the network was trained on (all but the PDF's own).
OOD_FLAGS: tuple[str, ...] = FLAG_NAMES[1:]

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
#: Smallest plateau (pixels) flagged as saturated whatever the training set showed: an unsaturated peak
#: centred between pixels has up to four near-equal pixels.
PLATEAU_MIN_PIXELS = 6
#: Share of the training set beyond each data-driven threshold (per side of each feature) ...
TAIL_FRACTION = 0.001
#: ... but for the asymmetry, whose training tail is the simulation's own neighbours, a wider tail catches
#: more blends for 0.5% of in-range objects flagged; for the concentration, 0.2% takes injected stars from
#: 95% to 97% caught.
TAIL_FRACTION_BY_FEATURE = {"asymmetry": 0.005, "concentration": 0.002, "blend_score": 0.002}
#: The blend detector's input: the central BLEND_CROP_PIXELS of the r+i image, divided by the flux in its central
#: BLEND_CORE_PIXELS, through asinh(BLEND_ASINH_SCALE x) (bright and faint galaxies alike).
BLEND_CROP_PIXELS, BLEND_CORE_PIXELS, BLEND_ASINH_SCALE = 32, 16, 50.0

#: Profile features whose threshold depends on the r magnitude (bright galaxies are large and seen at high
#: signal-to-noise, faint ones compact): one threshold per :data:`R_MAG_BIN_WIDTH` bin of ``r_mag``, the tail
#: quantile of the training objects within :data:`R_MAG_POOL` of it.
BINNED_FEATURES = ("concentration", "asymmetry")
R_MAG_BIN_WIDTH, R_MAG_POOL = 0.5, 0.5
#: Features with a data-driven threshold: (feature, side, threshold key, flag).
_RANGE_TESTS: tuple[tuple[str, str, str, str], ...] = (
    ("ebv", "above", "ebv_max", "ebv_above_training"),
    ("r_mag", "below", "r_mag_min", "r_above_training"),
    ("r_mag", "above", "r_mag_max", "r_below_training"),
    ("concentration", "above", "concentration_max", "point_source"),
    ("asymmetry", "above", "asymmetry_max", "blend"),
    ("snr_r", "below", "snr_r_min", "low_snr"),
    ("blend_score", "above", "blend_score_max", "blend"),
)


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


@functools.lru_cache(maxsize=16)
def _geometry(size: int, pixel_scale_arcsec: float) -> _Geometry:
    return _Geometry(size, pixel_scale_arcsec)


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

    aperture = geo.aperture
    flux_r = images[:, r_index, aperture].sum(axis=1, dtype=np.float64) - aperture.sum() * background[:, r_index]
    with np.errstate(divide="ignore", invalid="ignore"):
        r_mag = np.where(flux_r > 0, NANOMAGGY_ZEROPOINT_MAG - 2.5 * np.log10(np.maximum(flux_r, 1e-30)), np.inf)
        snr_r = flux_r / (sigma[:, r_index] * np.sqrt(aperture.sum()))
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
        keep = (np.abs(deviation) <= np.float32(CLIP_SIGMA) * sigma[:, :, None]).astype(np.float32)
        kept = deviation * keep
        count = np.maximum(keep @ ones, 1)
        shift = (kept @ ones) / count
        level = level + shift
        variance = np.einsum("nbk,nbk->nb", kept, kept) / count - shift**2
        sigma = np.sqrt(np.maximum(variance, 0)) / np.float32(CLIPPED_STD)
    return level.astype(np.float64), sigma.astype(np.float64)


def _shape_features(ri: np.ndarray, ri_sigma: np.ndarray, geo: _Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Concentration and noise-corrected asymmetry of r+i images (N, S, S) about their brightest central pixel.

    The asymmetry is the smallest over the nine rotation centres within half a pixel of that pixel (a
    rotation about a half-integer point maps pixels onto pixels): a symmetric galaxy whose centre falls
    between pixels is not mistaken for an asymmetric one.
    """
    n, size, _ = ri.shape
    c = size // 2
    half = max(1, int(round(geo.radius_pixels(CENTRE_SEARCH_ARCSEC))))
    box = ri[:, c - half: c + half + 1, c - half: c + half + 1].reshape(n, -1)
    peak = np.argmax(box, axis=1)
    py, px = c - half + peak // (2 * half + 1), c - half + peak % (2 * half + 1)
    radius = int(np.ceil(max(geo.radius_pixels(INNER_RADIUS_ARCSEC), geo.radius_pixels(ASYMMETRY_RADIUS_ARCSEC))))
    radius = min(radius, c - half - 2)
    (dy, dx), dist = _window(radius)
    rows = np.arange(n)[:, None]
    stamp = ri[rows, py[:, None] + dy, px[:, None] + dx]  # (N, window)
    core = stamp[:, dist <= geo.radius_pixels(CORE_RADIUS_ARCSEC)].sum(axis=1, dtype=np.float64)
    inner = stamp[:, dist <= geo.radius_pixels(INNER_RADIUS_ARCSEC)].sum(axis=1, dtype=np.float64)
    asym_mask = dist <= geo.radius_pixels(ASYMMETRY_RADIUS_ARCSEC)
    dy, dx, stamp = dy[asym_mask], dx[asym_mask], stamp[:, asym_mask]
    total = stamp.sum(axis=1, dtype=np.float64)
    # the nine rotations in one gather: the centre at (py + sy/2, px + sx/2) maps pixel offset d to s - d
    shifts = np.array([(sy, sx) for sy in (-1, 0, 1) for sx in (-1, 0, 1)])  # (9, 2)
    flat = (py * size + px)[:, None, None] + ((shifts[:, 0, None] - dy) * size + shifts[:, 1, None] - dx)[None]
    rotated = np.take_along_axis(ri.reshape(n, -1), flat.reshape(n, -1), axis=1).reshape(flat.shape)
    residual = np.abs(stamp[:, None, :] - rotated).sum(axis=2, dtype=np.float64).min(axis=1)
    # E|X - Y| for independent X, Y ~ N(0, s^2) is 2 s / sqrt(pi)
    noise = asym_mask.sum() * 2 * ri_sigma / np.sqrt(np.pi)
    with np.errstate(divide="ignore", invalid="ignore"):
        concentration = np.where(inner > 0, core / inner, 0.0)
        asymmetry = np.where(total > 0, (residual - noise) / total, np.inf)
    return concentration, asymmetry


def _identical_runs(images: np.ndarray) -> np.ndarray:
    """Whether any band of each cutout holds :data:`IDENTICAL_RUN_PIXELS` equal values in a row or a column."""
    n = images.shape[0]
    found = np.zeros(n, bool)
    for along_columns in (False, True):
        # run[..., k]: pixels k and k+1 of a row (or a column) are equal; compared in memory order either way
        run = images[:, :, 1:, :] == images[:, :, :-1, :] if along_columns else images[..., 1:] == images[..., :-1]
        # real sky noise has (almost) no equal neighbours: only cutouts with enough equal pairs can hold a run
        candidates = np.flatnonzero(np.count_nonzero(run.reshape(n, -1), axis=1) >= IDENTICAL_RUN_PIXELS - 1)
        if candidates.size:
            found[candidates] |= _has_run(np.swapaxes(run[candidates], 2, 3) if along_columns else run[candidates])
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
    under noise reaches its maximum only in its luckiest pixel)."""
    peak = images.max(axis=(2, 3)) - background  # (N, B)
    bright = peak > PLATEAU_MIN_PEAK_SIGMA * np.maximum(sigma, 1e-12)
    level = background + peak - np.maximum(PLATEAU_FRACTION * peak, PLATEAU_NOISE_SIGMA * sigma)
    counts = (images >= level[:, :, None, None].astype(np.float32)).sum(axis=(2, 3))
    return np.where(bright, counts, 0).max(axis=1)


def reference_thresholds(features: Mapping[str, np.ndarray], tail_fraction: float = TAIL_FRACTION) -> dict[str, Any]:
    """The data-driven thresholds from a training set's features: the ``tail_fraction`` and
    ``1 - tail_fraction`` quantiles (whichever side each flag tests), per r-magnitude bin for
    :data:`BINNED_FEATURES` (under ``by_r_mag``), and the saturation floor."""
    out: dict[str, Any] = {}
    tails = {feature: TAIL_FRACTION_BY_FEATURE.get(feature, tail_fraction) for feature, *_ in _RANGE_TESTS}
    for feature, side, key, _ in _RANGE_TESTS:
        if feature not in features:  # the blend score, without a detector
            continue
        values = np.asarray(features[feature], np.float64)
        values = values[np.isfinite(values)]
        q = 1 - tails[feature] if side == "above" else tails[feature]
        out[key] = float(np.quantile(values, q))
    out["plateau_pixels_max"] = float(max(PLATEAU_MIN_PIXELS - 1, np.max(features["plateau"])))
    r_mag = np.asarray(features["r_mag"], np.float64)
    finite = np.isfinite(r_mag)
    lo = np.floor(np.quantile(r_mag[finite], tail_fraction) / R_MAG_BIN_WIDTH) * R_MAG_BIN_WIDTH
    hi = np.ceil(np.quantile(r_mag[finite], 1 - tail_fraction) / R_MAG_BIN_WIDTH) * R_MAG_BIN_WIDTH
    edges = np.round(np.arange(lo, hi + R_MAG_BIN_WIDTH / 2, R_MAG_BIN_WIDTH), 6)
    binned: dict[str, Any] = {"r_mag_edges": edges.tolist()}
    for feature in BINNED_FEATURES:
        key = next(k for f, _, k, _ in _RANGE_TESTS if f == feature)
        values = np.asarray(features[feature], np.float64)
        limits = []
        for a, b in zip(edges[:-1], edges[1:], strict=True):
            pool = finite & (r_mag >= a - R_MAG_POOL) & (r_mag < b + R_MAG_POOL) & np.isfinite(values)
            # too few to estimate a tail (fewer than ten beyond it): the global threshold
            enough = pool.sum() * tails[feature] >= 10 or pool.sum() >= 500
            limits.append(float(np.quantile(values[pool], 1 - tails[feature])) if enough else out[key])
        binned[key] = limits
    out["by_r_mag"] = binned
    return out


def _binned_limit(thresholds: Mapping[str, Any], key: str, r_mag: np.ndarray) -> np.ndarray | float:
    """Each object's threshold of a binned feature (the global one outside the binned range or if absent)."""
    binned = thresholds.get("by_r_mag")
    if not isinstance(binned, Mapping) or key not in binned:
        return float(thresholds[key])
    edges, limits = np.asarray(binned["r_mag_edges"], np.float64), np.asarray(binned[key], np.float64)
    k = np.searchsorted(edges, r_mag, side="right") - 1
    inside = (k >= 0) & (k < len(limits))
    return np.where(inside, limits[np.clip(k, 0, len(limits) - 1)], float(thresholds[key]))


def quality_metadata(features: Mapping[str, np.ndarray], reference: dict[str, Any],
                     tail_fraction: float = TAIL_FRACTION,
                     blend_net: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The bundle metadata section ``quality``: thresholds, what they were measured on, and how; with
    ``blend_net`` (``onnx_base64`` and how it was trained: ``photoz.training.release.blend``) the blend detector whose
    ``blend_score`` the features carry."""
    return {"features_version": FEATURES_VERSION, "tail_fraction": tail_fraction,
            **({"blend_net": dict(blend_net)} if blend_net is not None else {}),
            "tail_fraction_by_feature": dict(TAIL_FRACTION_BY_FEATURE),
            "reference": {**reference, "n_objects": int(len(features["ebv"]))},
            "thresholds": reference_thresholds(features, tail_fraction),
            "definitions": {"aperture_radius_arcsec": APERTURE_RADIUS_ARCSEC,
                            "background_radius_arcsec": BACKGROUND_RADIUS_ARCSEC,
                            "core_radius_arcsec": CORE_RADIUS_ARCSEC, "inner_radius_arcsec": INNER_RADIUS_ARCSEC,
                            "asymmetry_radius_arcsec": ASYMMETRY_RADIUS_ARCSEC,
                            "identical_run_pixels": IDENTICAL_RUN_PIXELS,
                            "plateau_fraction": PLATEAU_FRACTION, "plateau_noise_sigma": PLATEAU_NOISE_SIGMA,
                            "plateau_min_peak_sigma": PLATEAU_MIN_PEAK_SIGMA,
                            "blend_crop_pixels": BLEND_CROP_PIXELS, "blend_core_pixels": BLEND_CORE_PIXELS,
                            "blend_asinh_scale": BLEND_ASINH_SCALE}}


def quality_summary(quality: Mapping[str, Any]) -> dict[str, Any]:
    """The ``quality`` section as an API shows it: the blend detector's graph (a few hundred kB of base64) as
    its size and sha256."""
    import base64
    import hashlib

    out = dict(quality)
    if isinstance(out.get("blend_net"), Mapping) and "onnx_base64" in out["blend_net"]:
        net = dict(out["blend_net"])
        raw = base64.b64decode(net.pop("onnx_base64"))
        out["blend_net"] = {**net, "onnx_bytes": len(raw), "onnx_sha256": hashlib.sha256(raw).hexdigest()}
    return out


def usable_thresholds(quality: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A bundle's thresholds if they were measured with this code's feature definitions, else None."""
    if not quality or quality.get("features_version") != FEATURES_VERSION:
        return None
    return dict(quality.get("thresholds", {}))


def flag_bits_from_features(features: Mapping[str, np.ndarray], thresholds: Mapping[str, Any] | None,
                            probs: np.ndarray | None = None) -> np.ndarray:
    """(N,) uint32 flag bits (:data:`FLAG_BITS`) from the features, the thresholds (None: fixed flags only)
    and, when given, the PDFs (the grid-edge flag)."""
    n = len(features["ebv"])
    bits = np.zeros(n, np.uint32)
    if probs is not None:
        bits |= pdf_flag_bits(probs)
    bits |= np.where(features["identical_run"], FLAG_BITS["masked_pixels"], 0).astype(np.uint32)
    floor = PLATEAU_MIN_PIXELS - 1
    if thresholds is not None:
        floor = thresholds.get("plateau_pixels_max", floor)
    bits |= np.where(features["plateau"] > floor, FLAG_BITS["saturated"], 0).astype(np.uint32)
    if thresholds is not None:
        for feature, side, key, flag in _RANGE_TESTS:
            if key not in thresholds or feature not in features:
                continue
            values = np.asarray(features[feature], np.float64)
            limit = _binned_limit(thresholds, key, features["r_mag"]) if feature in BINNED_FEATURES \
                else float(thresholds[key])
            out = values > limit if side == "above" else values < limit
            bits |= np.where(out, FLAG_BITS[flag], 0).astype(np.uint32)
    return bits


def pdf_flag_bits(probs: np.ndarray) -> np.ndarray:
    """The flag bits a PDF alone gives (the grid edge), for rows without cutout features."""
    return np.where(at_grid_edge(probs), FLAG_BITS[GRID_EDGE_FLAG], 0).astype(np.uint32)


def flag_names(bits: np.ndarray) -> list[list[str]]:
    """The flag names of each row's bits, in bit order."""
    bits = np.asarray(bits, np.uint32)
    if not bits.any():
        return [[] for _ in range(len(bits))]
    return [[name for name, bit in FLAG_BITS.items() if b & bit] if b else [] for b in bits.tolist()]


def bits_from_names(names: list[list[str]] | list[str]) -> np.ndarray:
    """Flag bits from names per row (lists, or comma-joined strings); unknown names are ignored."""
    rows = [n.split(",") if isinstance(n, str) else n for n in names]
    return np.array([sum(FLAG_BITS.get(name, 0) for name in set(row) if name) for row in rows], np.uint32)


class QualityFlagger:
    """A bundle's flagging: ``flag_bits(images, ebv, probs)`` -> (N,) uint32."""

    def __init__(self, bands: tuple[str, ...], pixel_scale_arcsec: float, quality: Mapping[str, Any] | None) -> None:
        self.bands, self.pixel_scale_arcsec = bands, pixel_scale_arcsec
        self.thresholds = usable_thresholds(quality)
        self.enabled = "r" in bands and "i" in bands
        self.blend_net = BlendNet.from_quality(quality) if self.enabled else None

    def flag_bits(self, images: np.ndarray, ebv: np.ndarray, probs: np.ndarray) -> np.ndarray:
        return pdf_flag_bits(probs) | self.image_bits(images, ebv)

    def image_bits(self, images: np.ndarray, ebv: np.ndarray) -> np.ndarray:
        """The flags measured on the cutouts, all but the PDF's own: (N,) uint32. Independent of the network, so
        a server measures them beside the inference rather than on its thread."""
        if not self.enabled or len(images) == 0:
            return np.zeros(len(images), np.uint32)
        features = cutout_features(images, np.asarray(ebv).reshape(-1), self.bands, self.pixel_scale_arcsec,
                                   self.blend_net)
        return flag_bits_from_features(features, self.thresholds)
