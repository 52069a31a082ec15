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

The features themselves are defined and measured by :mod:`photoz.model.features` (numpy: what the training
side measures the thresholds with); the flagger measures them with :mod:`photoz.model.features_jit`, the same
definitions compiled with numba, where numba is installed.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from photoz.model import features_jit
from photoz.model.features import (
    APERTURE_RADIUS_ARCSEC,
    ASYMMETRY_RADIUS_ARCSEC,
    BACKGROUND_RADIUS_ARCSEC,
    BLEND_ASINH_SCALE,
    BLEND_CORE_PIXELS,
    BLEND_CROP_PIXELS,
    CORE_RADIUS_ARCSEC,
    FEATURES_VERSION,
    IDENTICAL_RUN_PIXELS,
    INNER_RADIUS_ARCSEC,
    PLATEAU_FRACTION,
    PLATEAU_MIN_PEAK_SIGMA,
    PLATEAU_NOISE_SIGMA,
    BlendNet,
    cutout_features,
)
from photoz.model.pdf import GRID_EDGE_FLAG, at_grid_edge

#: Flag names by bit, in bit order (bit k is ``1 << k``).
FLAG_NAMES: tuple[str, ...] = (GRID_EDGE_FLAG, "ebv_above_training", "r_above_training", "r_below_training",
                               "point_source", "blend", "masked_pixels", "saturated", "low_snr")
FLAG_BITS: dict[str, int] = {name: 1 << k for k, name in enumerate(FLAG_NAMES)}
#: The flags that say an object lies outside what the network was trained on (all but the PDF's own).
OOD_FLAGS: tuple[str, ...] = FLAG_NAMES[1:]

#: Smallest plateau (pixels) flagged as saturated whatever the training set showed: an unsaturated peak
#: centred between pixels has up to four near-equal pixels.
PLATEAU_MIN_PIXELS = 6
#: Share of the training set beyond each data-driven threshold (per side of each feature) ...
TAIL_FRACTION = 0.001
#: ... but for the asymmetry, whose training tail is the simulation's own neighbours, a wider tail catches
#: more blends for 0.5% of in-range objects flagged; for the concentration, 0.2% takes injected stars from
#: 95% to 97% caught.
TAIL_FRACTION_BY_FEATURE = {"asymmetry": 0.005, "concentration": 0.002, "blend_score": 0.002}

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
    values = np.asarray(bits, np.uint32).tolist()
    return [[name for name, bit in FLAG_BITS.items() if b & bit] if b else [] for b in values]


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
        measure = features_jit.cutout_features if features_jit.available() else cutout_features
        features = measure(images, np.asarray(ebv).reshape(-1), self.bands, self.pixel_scale_arcsec, self.blend_net)
        return flag_bits_from_features(features, self.thresholds)
