"""Redshift PDFs on a bin grid: point estimates and photo-z metrics (numpy only).

A PDF is a vector of probabilities, one per redshift bin, summing to one. It
is read as a *histogram density*: constant inside each bin, so the CDF is
piecewise linear between bin edges. Every summary below follows from that
one reading, so mean, median, intervals, CRPS and PIT are mutually consistent
and no estimate is biased by half a bin (expectations use bin centres, not
left edges).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from photoz.model.conventions import (
    DEFAULT_N_BINS,
    DEFAULT_Z_MAX,
    DEFAULT_Z_MIN,
    OUTLIER_DZ_THRESHOLD,
)

#: Scale factor that turns a median absolute deviation into a Gaussian sigma.
MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class RedshiftBins:
    """Redshift bin grid of a PDF. ``edges`` has ``n_bins + 1`` increasing values."""

    edges: np.ndarray

    def __post_init__(self) -> None:
        edges = np.asarray(self.edges, dtype=np.float64)
        if edges.ndim != 1 or edges.size < 2:
            raise ValueError(f"bin edges must be a 1-d array of >= 2 values, got shape {edges.shape}")
        if not np.all(np.diff(edges) > 0):
            raise ValueError("bin edges must be strictly increasing")
        object.__setattr__(self, "edges", edges)

    @classmethod
    def uniform(cls, z_min: float = DEFAULT_Z_MIN, z_max: float = DEFAULT_Z_MAX,
                n_bins: int = DEFAULT_N_BINS) -> RedshiftBins:
        return cls(np.linspace(z_min, z_max, n_bins + 1))

    @classmethod
    def from_metadata(cls, doc: dict[str, Any]) -> RedshiftBins:
        """From a bundle's ``redshift_bins``: either ``edges`` or ``z_min``/``z_max``/``n_bins``."""
        if "edges" in doc:
            return cls(np.asarray(doc["edges"], dtype=np.float64))
        return cls.uniform(float(doc["z_min"]), float(doc["z_max"]), int(doc["n_bins"]))

    def to_metadata(self) -> dict[str, Any]:
        if np.allclose(np.diff(self.edges), self.widths[0], rtol=1e-9, atol=0):
            return {"z_min": float(self.edges[0]), "z_max": float(self.edges[-1]), "n_bins": self.n_bins}
        return {"edges": self.edges.tolist()}

    @property
    def n_bins(self) -> int:
        return self.edges.size - 1

    @property
    def centres(self) -> np.ndarray:
        return 0.5 * (self.edges[:-1] + self.edges[1:])

    @property
    def widths(self) -> np.ndarray:
        return np.diff(self.edges)

    def index_of(self, z: ArrayLike) -> np.ndarray:
        """Bin index of each redshift, clipped to the grid (for one-hot targets)."""
        return np.clip(np.searchsorted(self.edges, z, side="right") - 1, 0, self.n_bins - 1)


def _as_pdfs(pdfs: ArrayLike, bins: RedshiftBins) -> np.ndarray:
    p = np.atleast_2d(np.asarray(pdfs, dtype=np.float64))
    if p.shape[-1] != bins.n_bins:
        raise ValueError(f"PDFs have {p.shape[-1]} bins, the grid has {bins.n_bins}")
    return p


def cdf_at_edges(pdfs: ArrayLike, bins: RedshiftBins) -> np.ndarray:
    """CDF at every bin edge, shape (N, n_bins + 1), starting at 0 and ending at 1."""
    p = _as_pdfs(pdfs, bins)
    cdf = np.concatenate([np.zeros((p.shape[0], 1)), np.cumsum(p, axis=1)], axis=1)
    return cdf / cdf[:, -1:]


def quantile(pdfs: ArrayLike, bins: RedshiftBins, q: float) -> np.ndarray:
    """Redshift below which a fraction ``q`` (0 < q < 1) of each PDF lies."""
    cdf = cdf_at_edges(pdfs, bins)
    # first edge where the CDF reaches q; the quantile lies in the bin before it
    upper = np.argmax(cdf >= q, axis=1)
    upper = np.maximum(upper, 1)
    rows = np.arange(cdf.shape[0])
    lo, hi = cdf[rows, upper - 1], cdf[rows, upper]
    frac = np.where(hi > lo, (q - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0)
    return bins.edges[upper - 1] + frac * bins.widths[upper - 1]


#: The point estimates of :func:`point_estimates`, in the order every output lists them.
ESTIMATES: tuple[str, ...] = ("z_mean", "z_median", "z_mode", "z_std", "z_lo68", "z_hi68", "z_lo95", "z_hi95",
                               "z_epistemic_std")
#: The estimate that is not a property of the PDF: the spread of the mean redshift over a deep ensemble's members
#: or MC dropout's passes (their disagreement, epistemic uncertainty), a second output of such a bundle's graph;
#: NaN for a single network, which cannot measure it.
EPISTEMIC_ESTIMATE = "z_epistemic_std"

#: Flag of a PDF that may extend beyond the grid: at least ``EDGE_PROBABILITY`` of it
#: lies in the top ``EDGE_BINS`` bins.
GRID_EDGE_FLAG = "pdf_at_grid_edge"
EDGE_PROBABILITY, EDGE_BINS = 0.1, 5


def at_grid_edge(pdfs: np.ndarray) -> np.ndarray:
    """Boolean per row: the PDF may extend beyond the top of the grid (NaN rows: False)."""
    pdfs = np.asarray(pdfs)
    if pdfs.ndim != 2 or pdfs.shape[0] == 0:
        return np.zeros(pdfs.shape[0] if pdfs.ndim else 0, bool)
    return np.asarray(np.nan_to_num(pdfs[:, -EDGE_BINS:]).sum(axis=1) >= EDGE_PROBABILITY)


def point_estimates(pdfs: ArrayLike, bins: RedshiftBins,
                    epistemic_std: ArrayLike | None = None) -> dict[str, np.ndarray]:
    """Mean, median, mode, standard deviation and 68%/95% central intervals.

    Returns a dict of arrays of length N: ``z_mean``, ``z_median``,
    ``z_mode``, ``z_std``, ``z_lo68``, ``z_hi68``, ``z_lo95``, ``z_hi95``, and
    ``z_epistemic_std``: ``epistemic_std`` as given (the members' spread a
    bundle's graph measures), NaN without it.
    """
    p = _as_pdfs(pdfs, bins)
    p = p / p.sum(axis=1, keepdims=True)
    c, w = bins.centres, bins.widths
    mean = p @ c
    # variance of a histogram density: between-bin spread plus the uniform
    # spread inside each bin (w^2 / 12)
    var = np.sum(p * ((c[None, :] - mean[:, None]) ** 2 + w[None, :] ** 2 / 12.0), axis=1)
    return {
        "z_mean": mean,
        "z_median": quantile(p, bins, 0.5),
        "z_mode": c[np.argmax(p / w[None, :], axis=1)],
        "z_std": np.sqrt(var),
        "z_lo68": quantile(p, bins, 0.15865525393145707),
        "z_hi68": quantile(p, bins, 0.8413447460685429),
        "z_lo95": quantile(p, bins, 0.025),
        "z_hi95": quantile(p, bins, 0.975),
        EPISTEMIC_ESTIMATE: np.full(len(p), np.nan) if epistemic_std is None
        else np.asarray(epistemic_std, np.float64).reshape(len(p)),
    }


def normalised_residuals(z_phot: ArrayLike, z_spec: ArrayLike) -> np.ndarray:
    """dz = (z_phot - z_spec) / (1 + z_spec)."""
    z_phot, z_spec = np.asarray(z_phot, dtype=np.float64), np.asarray(z_spec, dtype=np.float64)
    return (z_phot - z_spec) / (1.0 + z_spec)


def sigma_mad(dz: ArrayLike) -> float:
    """sigma_MAD = 1.4826 x median(|dz - median(dz)|)."""
    dz = np.asarray(dz, dtype=np.float64)
    return float(MAD_TO_SIGMA * np.median(np.abs(dz - np.median(dz))))


def outlier_fraction(dz: ArrayLike, threshold: float = OUTLIER_DZ_THRESHOLD) -> float:
    """Fraction of objects with |dz| > threshold (0.05, Pasquet et al. 2019)."""
    return float(np.mean(np.abs(np.asarray(dz)) > threshold))


def pit(pdfs: ArrayLike, bins: RedshiftBins, z_true: ArrayLike) -> np.ndarray:
    """Probability integral transform: each PDF's CDF at the true redshift."""
    cdf = cdf_at_edges(pdfs, bins)
    z_true = np.asarray(z_true, dtype=np.float64)
    return np.array([np.interp(z, bins.edges, row) for z, row in zip(z_true, cdf, strict=True)])


def ks_uniform(values: ArrayLike) -> float:
    """Kolmogorov-Smirnov statistic of values in [0, 1] against the uniform law."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    n = x.size
    i = np.arange(1, n + 1)
    return float(max(np.max(i / n - x), np.max(x - (i - 1) / n)))


def crps(pdfs: ArrayLike, bins: RedshiftBins, z_true: ArrayLike) -> np.ndarray:
    """Continuous ranked probability score of each PDF, in units of redshift.

    CRPS = integral of (F(z) - H(z - z_true))^2 dz, computed exactly for the
    piecewise-linear CDF F of a histogram density. A true redshift outside
    the grid adds its distance to the grid (F is 0 below and 1 above it).
    """
    cdf = cdf_at_edges(pdfs, bins)
    z = np.asarray(z_true, dtype=np.float64)[:, None]
    a, b = bins.edges[None, :-1], bins.edges[None, 1:]
    y0, y1 = cdf[:, :-1], cdf[:, 1:]

    def sq_integral(lo: np.ndarray, hi: np.ndarray, f0: np.ndarray, f1: np.ndarray) -> np.ndarray:
        # integral over [lo, hi] of a linear function from f0 to f1, squared
        return np.maximum(hi - lo, 0.0) * (f0 * f0 + f0 * f1 + f1 * f1) / 3.0

    below = b <= z
    above = a >= z
    inside = ~below & ~above
    total = np.where(below, sq_integral(a, b, y0, y1), 0.0)
    total += np.where(above, sq_integral(a, b, 1 - y0, 1 - y1), 0.0)
    zc = np.clip(z, a, b)
    f_z = y0 + (y1 - y0) * (zc - a) / (b - a)
    split = sq_integral(a, zc, y0, f_z) + sq_integral(zc, b, 1 - f_z, 1 - y1)
    total += np.where(inside, split, 0.0)
    result = total.sum(axis=1)
    z = z[:, 0]
    result += np.clip(bins.edges[0] - z, 0, None) + np.clip(z - bins.edges[-1], 0, None)
    return result


#: RAIL's outlier rule (DESC; qp's PointOutlierRate): |dz| > max(RAIL_OUTLIER_FLOOR, 3 sigma_IQR)
RAIL_OUTLIER_FLOOR: float = 0.06


def rail_point_metrics(z_phot: ArrayLike, z_spec: ArrayLike) -> dict[str, float]:
    """The point-estimate metrics of LSST DESC's RAIL (qp.metrics: PointBias, PointSigmaIQR,
    PointOutlierRate), so numbers compare with the DESC literature: the median of dz, the interquartile
    range of dz over 1.349, and the fraction with |dz| beyond the larger of 0.06 and 3 sigma_IQR."""
    dz = normalised_residuals(z_phot, z_spec)
    q75, q25 = np.percentile(dz, [75.0, 25.0])
    sigma_iqr = float((q75 - q25) / 1.349)
    return {"rail_bias": float(np.median(dz)), "rail_sigma_iqr": sigma_iqr,
            "rail_outlier_rate": float(np.mean(np.abs(dz) > max(RAIL_OUTLIER_FLOOR, 3.0 * sigma_iqr)))}


def interval_coverage(pdfs: ArrayLike, bins: RedshiftBins, z_true: ArrayLike, level: float) -> float:
    """Fraction of true redshifts inside each PDF's central interval holding ``level`` of its probability
    (0.68 and 0.95 for calibrated PDFs at those levels)."""
    lo = quantile(pdfs, bins, (1.0 - level) / 2.0)
    hi = quantile(pdfs, bins, (1.0 + level) / 2.0)
    z = np.asarray(z_true, dtype=np.float64)
    return float(np.mean((z >= lo) & (z <= hi)))


def photoz_metrics(z_phot: ArrayLike, z_spec: ArrayLike, pdfs: ArrayLike | None = None,
                   bins: RedshiftBins | None = None) -> dict[str, float]:
    """Standard photo-z metrics of a set of objects.

    ``sigma_mad``, ``outlier_fraction`` (|dz| > 0.05), ``bias`` (mean dz) and
    ``n`` (Pasquet et al. 2019's), RAIL's ``rail_bias``, ``rail_sigma_iqr`` and
    ``rail_outlier_rate``; with PDFs also ``crps`` (mean), ``pit_ks`` (KS
    statistic of the PIT values against uniform: 0 for perfectly calibrated
    PDFs) and ``coverage_68`` / ``coverage_95`` (fraction of true redshifts in
    the central 68% / 95% intervals).
    """
    dz = normalised_residuals(z_phot, z_spec)
    out: dict[str, float] = {
        "n": int(dz.size),
        "sigma_mad": sigma_mad(dz),
        "outlier_fraction": outlier_fraction(dz),
        "bias": float(np.mean(dz)),
        **rail_point_metrics(z_phot, z_spec),
    }
    if pdfs is not None:
        if bins is None:
            raise ValueError("PDF metrics need the bins the PDFs are on")
        out["crps"] = float(np.mean(crps(pdfs, bins, z_spec)))
        out["pit_ks"] = ks_uniform(pit(pdfs, bins, z_spec))
        out["coverage_68"] = interval_coverage(pdfs, bins, z_spec, 0.68)
        out["coverage_95"] = interval_coverage(pdfs, bins, z_spec, 0.95)
    return out
