"""Redshift priors: a PDF re-weighted from the population it was trained on to the user's.

A network's PDF p(z|x) carries its training set's redshift distribution pi_train(z) as an implicit prior. For a
sample whose n(z) differs (another magnitude limit, a colour cut, a cluster field), Bayes' theorem swaps it:

    p_new(z|x)  ~  p(z|x) * pi_new(z) / pi_train(z)        (renormalised over the bins)

with pi_train the training set's n(z) on the model's bins, which the bundle records (``training.n_z``;
``photoz record-prior`` adds it to an older bundle). The priors one can ask for (:func:`resolve`):

``train``   the training set's: the PDFs as the network gives them, untouched (the default);
``flat``    uniform in z over the model's range;
``custom``  a histogram the user sends (edges, weights), its density integrated over each model bin;
``self``    the population being estimated: its n(z) from its own PDFs by the EM deconvolution
            (:func:`population_nz`), for at least :data:`MIN_OBJECTS_SELF` objects.

Regularisation. pi_train is a histogram of a finite training set: its bins far in the tails hold few galaxies
or none, and the ratio pi_new / pi_train there is noise. Every n(z) here (pi_train, the EM's estimate) is
taken with half a galaxy added to each bin (Jeffreys' pseudo-count), so no ratio divides by zero and a tail
bin with no training galaxy cannot receive a weight larger than its neighbours' by more than the counts say;
where the network puts no probability, no prior can create any. An object whose PDF has no probability
where the new prior has any cannot be re-weighted: it is that object's error.

Numpy only: the service, ``photoz predict`` and the RAIL stage use it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from photoz.model.pdf import EPISTEMIC_ESTIMATE, GRID_EDGE_FLAG, RedshiftBins, point_estimates
from photoz.model.quality import FLAG_BITS, pdf_flag_bits

PRIOR_NAMES = ("train", "flat", "self", "custom")
#: Pseudo-count added to every bin of an n(z) histogram (Jeffreys): see the module docstring.
PSEUDO_COUNT = 0.5
#: Fewest objects ``prior=self`` takes. The EM estimate of n(z) on ~180 bins from fewer galaxies follows their
#: individual PDFs rather than their population; at 200 its per-bin noise is below the training prior's
#: shape differences that the benchmark's subsamples show (python -m benchmarks.priors).
MIN_OBJECTS_SELF = 200
#: EM iterations at most, and the change in n(z) (largest per bin, probability) that ends them sooner. Early
#: stopping is the EM's regularisation: the population's mean redshift converges within a few iterations, while
#: later ones fit the noise of the individual PDFs (the n(z) grows spiky). Measured with the shipped bundle on
#: 8,192 held-out simulated galaxies (python -m benchmarks.priors): the whole set, whose n(z) is the training
#: set's, keeps PIT KS 0.006 under the training prior and gets 0.008 / 0.013 / 0.031 under prior=self after
#: 5 / 10 / 30 iterations, while a redshift shell's bias is within 0.0003 of its converged value from 5 on.
EM_MAX_ITERATIONS, EM_TOLERANCE = 8, 1e-5
#: Why an object could not be re-weighted.
ZERO_OVERLAP = "the requested prior gives zero probability wherever this object's PDF is non-zero"


class PriorError(ValueError):
    """A prior that cannot be used: ``field`` says which input, the message what was expected and what came."""

    def __init__(self, field_name: str, expected: str, received: str) -> None:
        super().__init__(f"{field_name}: expected {expected}, got {received}")
        self.field, self.expected, self.received = field_name, expected, received


@dataclass(frozen=True)
class Prior:
    """A prior resolved against a bundle: ``weights`` per model bin (probabilities, summing to 1), None for
    ``train`` (nothing to do) and for ``self`` until :meth:`for_population` computes it."""

    name: str
    weights: np.ndarray | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def is_identity(self) -> bool:
        return self.name == "train"

    def describe(self) -> dict[str, Any]:
        """What the answer says about the prior applied (JSON-ready)."""
        out: dict[str, Any] = {"name": self.name, **self.details}
        if self.weights is not None:
            out["n_z"] = np.round(self.weights, 8).tolist()
        return out


def training_nz(metadata_document: dict[str, Any], bins: RedshiftBins) -> np.ndarray | None:
    """The training set's n(z) per model bin (probabilities, regularised), or None if the bundle lacks it."""
    record = metadata_document.get("training", {}).get("n_z")
    if not isinstance(record, dict) or "counts" not in record:
        return None
    counts = np.asarray(record["counts"], np.float64)
    if counts.shape != (bins.n_bins,) or not np.isfinite(counts).all() or (counts < 0).any():
        return None
    return regularised(counts)


def regularised(counts: np.ndarray) -> np.ndarray:
    """Counts per bin -> probabilities with :data:`PSEUDO_COUNT` added to each bin."""
    counts = np.asarray(counts, np.float64) + PSEUDO_COUNT
    return counts / counts.sum()


def nz_record(z: np.ndarray, bins: RedshiftBins, source: str) -> dict[str, Any]:
    """The bundle's ``training.n_z`` from the training set's redshifts: counts per model bin (those outside the
    grid counted as ``outside``), how many, and where they came from."""
    z = np.asarray(z, np.float64)
    counts, _ = np.histogram(z, bins=bins.edges)
    return {"counts": counts.astype(int).tolist(), "n_objects": int(z.size),
            "outside_grid": int(z.size - counts.sum()), "source": source}


def rebin(edges: np.ndarray, weights: np.ndarray, bins: RedshiftBins) -> np.ndarray:
    """A histogram (``edges`` (m+1,), ``weights`` (m,), any normalisation) as probabilities per model bin: its
    density, constant within each of its bins, integrated over each model bin."""
    cdf = np.concatenate([[0.0], np.cumsum(weights)])
    mass = np.diff(np.interp(bins.edges, edges, cdf, left=0.0, right=cdf[-1]))
    return mass / mass.sum() if mass.sum() > 0 else mass


def resolve(name: str | None, bins: RedshiftBins, train: np.ndarray | None, edges: Any = None,
            weights: Any = None) -> Prior:
    """The prior a request asked for, checked. ``edges`` and ``weights`` (sequences of numbers) make a custom
    histogram (``name`` may then be omitted). Raises :class:`PriorError` naming the field at fault."""
    name = (name or ("custom" if edges is not None or weights is not None else "train")).strip().lower()
    if name not in PRIOR_NAMES:
        raise PriorError("prior", f"one of {', '.join(PRIOR_NAMES)}", repr(name))
    if name == "train":
        if edges is not None or weights is not None:
            raise PriorError("prior", "prior_edges and prior_weights only with prior=custom", "prior=train")
        return Prior("train", None, {"recorded": train is not None})
    if train is None:
        raise PriorError("prior", "prior=train: this bundle does not record its training set's n(z), which "
                                  "every other prior divides out (add it with photoz record-prior)", repr(name))
    if name == "flat":
        return Prior("flat", bins.widths / bins.widths.sum())
    if name == "self":
        return Prior("self", None, {"min_objects": MIN_OBJECTS_SELF})
    return Prior("custom", _custom(edges, weights, bins), {"edges": np.asarray(edges, float).tolist(),
                                                          "weights": np.asarray(weights, float).tolist()})


def _custom(edges: Any, weights: Any, bins: RedshiftBins) -> np.ndarray:
    if edges is None or weights is None:
        raise PriorError("prior_edges" if edges is None else "prior_weights",
                         "both prior_edges (m+1 redshifts) and prior_weights (m values) with prior=custom",
                         "only one of them")
    e, w = _numbers(edges, "prior_edges"), _numbers(weights, "prior_weights")
    if e.size < 2 or not np.all(np.diff(e) > 0):
        raise PriorError("prior_edges", "at least 2 strictly increasing redshifts", f"{e.tolist()[:10]}")
    if w.size != e.size - 1:
        raise PriorError("prior_weights", f"{e.size - 1} weights (one per histogram bin)", f"{w.size}")
    if (w < 0).any() or w.sum() <= 0:
        raise PriorError("prior_weights", "non-negative weights with a positive sum", f"{w.tolist()[:10]}")
    mass = rebin(e, w, bins)
    if mass.sum() <= 0:
        raise PriorError("prior_edges", f"a histogram overlapping the model's range {bins.edges[0]:g} <= z < "
                                        f"{bins.edges[-1]:g}", f"{e[0]:g}-{e[-1]:g}")
    return mass


def _numbers(values: Any, name: str) -> np.ndarray:
    try:
        array = np.asarray(values, np.float64).ravel()
    except (TypeError, ValueError):
        raise PriorError(name, "a list of numbers", repr(values)[:80]) from None
    if not np.isfinite(array).all():
        raise PriorError(name, "finite numbers", f"{array.tolist()[:10]}")
    return array


def population_nz(probs: np.ndarray, train: np.ndarray, max_iterations: int = EM_MAX_ITERATIONS,
                  tolerance: float = EM_TOLERANCE) -> tuple[np.ndarray, int]:
    """The n(z) of a population from its PDFs (N, n_bins) by expectation-maximisation: each object's likelihood
    is its PDF over the training prior; the population's n(z) is the mean of the objects' posteriors under
    the current n(z), iterated from the training prior (the standard deconvolution, e.g. Padmanabhan et al.
    2005), with :data:`PSEUDO_COUNT` per bin. Returns the n(z) (probabilities) and the iterations taken."""
    likelihood = np.asarray(probs, np.float64) / train[None, :]
    likelihood /= likelihood.sum(axis=1, keepdims=True)
    n = len(likelihood)
    nz = train.copy()
    for iteration in range(1, max_iterations + 1):
        posterior = likelihood * nz[None, :]
        posterior /= posterior.sum(axis=1, keepdims=True)
        new = (posterior.sum(axis=0) + PSEUDO_COUNT) / (n + PSEUDO_COUNT * len(nz))
        change = float(np.abs(new - nz).max())
        nz = new
        if change < tolerance:
            return nz, iteration
    return nz, max_iterations


def for_population(prior: Prior, probs: np.ndarray, train: np.ndarray) -> Prior:
    """``prior=self`` made concrete for these objects' PDFs (others returned as they are)."""
    if prior.name != "self":
        return prior
    if len(probs) < MIN_OBJECTS_SELF:
        raise PriorError("prior", f"prior=self on at least {MIN_OBJECTS_SELF} valid objects (their n(z) is "
                                  "estimated from their PDFs); send more, or a named or custom prior",
                         f"{len(probs)} valid objects")
    nz, iterations = population_nz(probs, train)
    return Prior("self", nz, {"n_objects": int(len(probs)), "em_iterations": iterations})


def reweight(probs: np.ndarray, prior: Prior, train: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """PDFs (N, n_bins) under ``prior``: (new PDFs, ok) where ``ok`` is False for objects with no probability
    where the prior has any (their rows are left as they were). ``train``: the prior returns them unchanged."""
    if prior.is_identity or prior.weights is None:
        return probs, np.ones(len(probs), bool)
    assert train is not None
    weighted = np.asarray(probs, np.float64) * (prior.weights / train)[None, :]
    total = weighted.sum(axis=1)
    ok = np.isfinite(total) & (total > 0)
    out = np.array(probs, np.float32, copy=True)
    out[ok] = (weighted[ok] / total[ok, None]).astype(np.float32)
    return out, ok


def apply(outputs: dict[str, np.ndarray], prior: Prior, train: np.ndarray | None,
          bins: RedshiftBins) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """An engine's outputs (``probs``, point estimates, ``flag_bits``) under ``prior``: the PDFs re-weighted,
    the point estimates and the PDF's own flag recomputed (``z_epistemic_std``, the network's spread, and the
    cutouts' flags kept). Returns the outputs and the ``ok`` mask of :func:`reweight`."""
    if prior.is_identity:
        return outputs, np.ones(len(outputs["probs"]), bool)
    probs, ok = reweight(outputs["probs"], prior, train)
    estimates = point_estimates(probs, bins, outputs.get(EPISTEMIC_ESTIMATE))
    new = {**outputs, **estimates, "probs": probs}
    if "flag_bits" in outputs:
        edge = np.uint32(FLAG_BITS[GRID_EDGE_FLAG])
        new["flag_bits"] = (outputs["flag_bits"] & ~edge) | pdf_flag_bits(probs)
    return new, ok
