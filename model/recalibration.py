"""Conditional PIT recalibration of redshift PDFs (numpy only; the graph's copy is
:class:`photoz.model.network.pasquet.PITRecalibrated`).

A temperature on the softmax (``photoz recalibrate``) fixes one global width. What it cannot fix is a PDF whose
miscalibration changes along the redshift axis: on simulator 1.6.0 the shipped network's PDFs are a little
biased high at photometric z < 0.07 (PIT values pile below 0.5) and too wide above 0.2, though calibrated
overall (PIT KS 0.011). This module fixes that the way Bordoloi, Lilly & Amara (2010, MNRAS 406, 881) fix a
global PIT histogram, made conditional on the photometric redshift (in the spirit of Dey et al. 2022, MNRAS
515, 5285, who condition on features): if the PIT values of objects whose PDF mean is near ``z_k`` have the
distribution function ``G_k``, the PDF whose CDF is ``G_k(F(z))`` has uniform PIT values there.

``G`` is tabulated at ``n_u + 1`` evenly spaced PIT values for each of a few redshift knots (triangular
weights in the PDF mean, so the map varies linearly between knots, as it is applied), and shrunk towards the
identity with ``prior_count`` pseudo-objects, so a knot with few objects is left nearly as it was. Applying it:
the PDF's CDF at the bin edges goes through ``G`` (linear between its tabulated points; ``G`` itself linear
between the two knots around the PDF's mean redshift) and the new PDF is the difference of the mapped CDF.
Every step is a gather or an arithmetic op, so it runs inside the ONNX graph, after the softmax.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from photoz.model.pdf import RedshiftBins, cdf_at_edges, pit

#: Redshift spacing of the map's knots (and so of its resolution along z), in redshift.
KNOT_SPACING_Z = 0.025
#: Tabulated points of each knot's PIT map: G at u = 0, 1/N_U, ..., 1.
N_U = 20
#: Pseudo-objects with uniform PIT values added at every knot: a knot with far fewer objects than this keeps
#: (nearly) the identity map, so sampling noise in sparse redshift ranges is not written into the PDFs.
PRIOR_COUNT = 50.0


@dataclass(frozen=True)
class PITMap:
    """A fitted conditional PIT map: ``table[k]`` is G at ``u = 0 .. 1`` (``table.shape[1]`` even steps) for
    objects whose PDF mean is ``z_knots[k]`` (redshift)."""

    z_knots: np.ndarray
    table: np.ndarray
    n_objects: int = 0
    prior_count: float = PRIOR_COUNT

    def __post_init__(self) -> None:
        knots = np.asarray(self.z_knots, np.float64)
        table = np.asarray(self.table, np.float64)
        if knots.ndim != 1 or knots.size < 2 or not np.all(np.diff(knots) > 0):
            raise ValueError(f"PIT map: z_knots must be >= 2 increasing redshifts, got {knots.tolist()}")
        if table.shape[0] != knots.size or table.ndim != 2 or table.shape[1] < 2:
            raise ValueError(f"PIT map: table must be (knots={knots.size}, >= 2), got {table.shape}")
        if not (np.allclose(table[:, 0], 0) and np.allclose(table[:, -1], 1) and np.all(np.diff(table, axis=1) >= 0)):
            raise ValueError("PIT map: every row must rise monotonically from 0 to 1")
        object.__setattr__(self, "z_knots", knots)
        object.__setattr__(self, "table", table)

    @property
    def n_u(self) -> int:
        return self.table.shape[1] - 1

    def rows_for(self, z_mean: ArrayLike) -> np.ndarray:
        """Each object's map: the table linearly interpolated between the knots around its mean redshift
        (the end knots' maps beyond them), shape (N, n_u + 1)."""
        seg, w = knot_weights(self.z_knots, z_mean)
        return (1 - w[:, None]) * self.table[seg] + w[:, None] * self.table[seg + 1]

    def apply(self, pdfs: ArrayLike, bins: RedshiftBins) -> np.ndarray:
        """The recalibrated PDFs (float64, rows summing to 1)."""
        cdf = cdf_at_edges(pdfs, bins)
        rows = self.rows_for(np.diff(cdf, axis=1) @ bins.centres)
        pos = np.clip(cdf * self.n_u, 0.0, self.n_u)
        j = np.clip(np.floor(pos).astype(np.int64), 0, self.n_u - 1)
        f = pos - j
        mapped = np.take_along_axis(rows, j, 1) * (1 - f) + np.take_along_axis(rows, j + 1, 1) * f
        q = np.clip(np.diff(mapped, axis=1), 0.0, None)
        return q / q.sum(axis=1, keepdims=True)

    def to_metadata(self) -> dict[str, Any]:
        return {"method": "conditional PIT map (Bordoloi et al. 2010, per photometric redshift)",
                "z_knots": [round(float(z), 6) for z in self.z_knots],
                "table": [[round(float(g), 6) for g in row] for row in self.table],
                "n_objects": int(self.n_objects), "prior_count": float(self.prior_count)}

    @classmethod
    def from_metadata(cls, doc: dict[str, Any]) -> PITMap:
        return cls(np.asarray(doc["z_knots"]), np.asarray(doc["table"]), int(doc.get("n_objects", 0)),
                   float(doc.get("prior_count", PRIOR_COUNT)))


def knot_weights(z_knots: np.ndarray, z_mean: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """For each redshift, the knot segment it lies in (its lower knot's index) and its linear weight on the
    upper knot (0 at or below the first knot, 1 at or beyond the last): how the map is fitted and applied."""
    z = np.asarray(z_mean, np.float64)
    seg = np.clip(np.searchsorted(z_knots, z, side="right") - 1, 0, z_knots.size - 2)
    return seg, np.clip((z - z_knots[seg]) / (z_knots[seg + 1] - z_knots[seg]), 0.0, 1.0)


def default_knots(bins: RedshiftBins, spacing: float = KNOT_SPACING_Z) -> np.ndarray:
    """Knots every ``spacing`` in redshift, at the centres of the steps that tile the grid."""
    n = max(int(round((bins.edges[-1] - bins.edges[0]) / spacing)), 2)
    step = (bins.edges[-1] - bins.edges[0]) / n
    return bins.edges[0] + step * (np.arange(n) + 0.5)


def fit_pit_map(pdfs: ArrayLike, bins: RedshiftBins, z_true: ArrayLike, z_knots: ArrayLike | None = None,
                n_u: int = N_U, prior_count: float = PRIOR_COUNT) -> PITMap:
    """Fit the map on labelled objects the network was not trained on (validation or calibration rows)."""
    p = np.asarray(pdfs, np.float64)
    z_true = np.asarray(z_true, np.float64)
    knots = default_knots(bins) if z_knots is None else np.asarray(z_knots, np.float64)
    values = pit(p, bins, z_true)
    z_mean = p @ bins.centres / p.sum(axis=1)
    u = np.linspace(0.0, 1.0, n_u + 1)
    below = (values[:, None] <= u[None, :]).astype(np.float64)  # (N, n_u + 1)
    # each object's weight at each knot: the linear interpolation weights the map is applied with
    weights = np.zeros((z_mean.size, knots.size))
    seg, w = knot_weights(knots, z_mean)
    rows = np.arange(z_mean.size)
    weights[rows, seg] += 1 - w
    weights[rows, seg + 1] += w
    table = (weights.T @ below + prior_count * u[None, :]) / (weights.sum(axis=0)[:, None] + prior_count)
    table[:, 0], table[:, -1] = 0.0, 1.0
    return PITMap(knots, np.maximum.accumulate(table, axis=1), int(z_mean.size), prior_count)
