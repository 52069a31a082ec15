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

A selection. A sample cut on what the network sees (a brighter magnitude limit, a colour cut) keeps p(z|x):
the posterior already conditions on the photometry the cut uses, so the sample's own n(z) as a prior counts the
cut twice. A request may therefore declare the sample's selection, its completeness C(z) (the fraction of the
parent population at z that the cut keeps; :func:`completeness_histogram` measures it on a reference catalogue
with redshifts). The prior applied is then the parent's, n_sample(z) / C(z): a custom histogram is read as the
selected sample's n(z) and divided by C; ``self`` fits the parent's n(z) by the EM with the selection in its
likelihood (each object's p(x|z) among the selected is p(x|z) / C(z)), regularised towards the training n(z)
where C is small (:func:`population_nz`). With C = 1 a custom n(z) is applied as it is without a selection.

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
#: A request's number-list fields beside ``prior``, in :func:`resolve`'s order (comma lists in a ``/v1`` query and
#: on the command line, lists in ``/v2`` parameters)
LIST_FIELDS = ("prior_edges", "prior_weights", "selection_edges", "selection_completeness")
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
#: Weight of the training n(z) in the EM of a selected sample's parent population, as a fraction of the sample
#: (:func:`population_nz`). 0.1: on 0.7.0's held-out galaxies cut to r < 17 or the red sequence, the bias and
#: PIT KS after 8 and after 100 iterations agree within 0.0002 and 0.01 (without it PIT KS drifts 0.021 ->
#: 0.060), and a redshift shell then cut keeps within 0.001 of the bias its true n(z) gives.
SELECTION_PRIOR_WEIGHT = 0.1
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
    #: the sample's selection, its completeness C(z) per model bin (None: not selected, C = 1)
    completeness: np.ndarray | None = None

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
            weights: Any = None, selection_edges: Any = None, selection_completeness: Any = None) -> Prior:
    """The prior a request asked for, checked. ``edges`` and ``weights`` (sequences of numbers) make a custom
    histogram (``name`` may then be omitted); ``selection_edges`` and ``selection_completeness`` declare the
    sample's selection (with ``self`` or a custom prior; the module docstring). Raises :class:`PriorError` naming
    the field at fault."""
    name = (name or ("custom" if edges is not None or weights is not None else "train")).strip().lower()
    if name not in PRIOR_NAMES:
        raise PriorError("prior", f"one of {', '.join(PRIOR_NAMES)}", repr(name))
    if selection_edges is not None or selection_completeness is not None:
        if name in ("train", "flat"):
            raise PriorError("selection_edges" if selection_edges is not None else "selection_completeness",
                             "a selection only with prior=self or a custom prior (the selected sample's own n(z)); "
                             f"{name} is already the parent population's", f"prior={name}")
        selection = resolve_selection(selection_edges, selection_completeness, bins)
        plain = resolve(name, bins, train, edges, weights)
        return select(plain, selection, {"edges": np.asarray(selection_edges, float).tolist(),
                                         "completeness": np.asarray(selection_completeness, float).tolist()})
    if name != "custom" and (edges is not None or weights is not None):
        raise PriorError("prior", "prior_edges and prior_weights only with prior=custom", f"prior={name}")
    if name == "train":
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
    e, w = _histogram(edges, weights, "prior_edges", "prior_weights", "weights", " with prior=custom")
    if (w < 0).any() or w.sum() <= 0:
        raise PriorError("prior_weights", "non-negative weights with a positive sum", f"{w.tolist()[:10]}")
    mass = rebin(e, w, bins)
    if mass.sum() <= 0:
        raise PriorError("prior_edges", f"a histogram overlapping the model's range {bins.edges[0]:g} <= z < "
                                        f"{bins.edges[-1]:g}", f"{e[0]:g}-{e[-1]:g}")
    return mass


def _histogram(edges: Any, values: Any, edges_name: str, values_name: str, what: str,
               when: str = "") -> tuple[np.ndarray, np.ndarray]:
    """A histogram's edges (m+1 strictly increasing redshifts) and values (m numbers), both given, checked."""
    if edges is None or values is None:
        raise PriorError(edges_name if edges is None else values_name,
                         f"both {edges_name} (m+1 redshifts) and {values_name} (m {what}){when}", "only one of them")
    e, v = _numbers(edges, edges_name), _numbers(values, values_name)
    if e.size < 2 or not np.all(np.diff(e) > 0):
        raise PriorError(edges_name, "at least 2 strictly increasing redshifts", f"{e.tolist()[:10]}")
    if v.size != e.size - 1:
        raise PriorError(values_name, f"{e.size - 1} {what} (one per histogram bin)", f"{v.size}")
    return e, v


def _numbers(values: Any, name: str) -> np.ndarray:
    try:
        array = np.asarray(values, np.float64).ravel()
    except (TypeError, ValueError):
        raise PriorError(name, "a list of numbers", repr(values)[:80]) from None
    if not np.isfinite(array).all():
        raise PriorError(name, "finite numbers", f"{array.tolist()[:10]}")
    return array


def resolve_selection(edges: Any, completeness: Any, bins: RedshiftBins) -> np.ndarray:
    """A selection's completeness histogram (``edges`` (m+1,) in z, ``completeness`` (m,) in [0, 1]) as C(z) per
    model bin: its mean over each bin, zero outside the histogram. Raises :class:`PriorError` naming the field."""
    e, c = _histogram(edges, completeness, "selection_edges", "selection_completeness", "fractions")
    if (c < 0).any() or (c > 1).any() or not (c > 0).any():
        raise PriorError("selection_completeness", "fractions kept, 0 <= C <= 1, not all 0", f"{c.tolist()[:10]}")
    integral = np.concatenate([[0.0], np.cumsum(c * np.diff(e))])
    per_bin = np.diff(np.interp(bins.edges, e, integral, left=0.0, right=integral[-1])) / bins.widths
    if not (per_bin > 0).any():
        raise PriorError("selection_edges", f"a histogram overlapping the model's range {bins.edges[0]:g} <= z < "
                                            f"{bins.edges[-1]:g} where it keeps anything", f"{e[0]:g}-{e[-1]:g}")
    return per_bin


def select(prior: Prior, completeness: np.ndarray, described: dict[str, Any]) -> Prior:
    """``prior`` (``self`` or custom: the selected sample's n(z)) for a sample selected with ``completeness`` per
    model bin: a custom n(z) becomes the parent's, n(z) / C (zero where C is); ``self`` keeps C for its EM."""
    details = {**prior.details, "selection": described}
    if prior.weights is None:
        return Prior(prior.name, None, details, completeness)
    parent = np.divide(prior.weights, completeness, out=np.zeros_like(prior.weights), where=completeness > 0)
    if parent.sum() <= 0:
        raise PriorError("selection_edges", "a selection that keeps some redshift where the prior has weight",
                         "no overlap")
    return Prior(prior.name, parent / parent.sum(), details, completeness)


def completeness_histogram(z: np.ndarray, selected: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """A selection's completeness C(z) on ``edges``, measured on a reference catalogue: for each bin, the
    fraction of its objects (redshifts ``z``) that the selection keeps (``selected``, booleans), with Jeffreys'
    half an object, (k + 1/2) / (n + 1), so a bin with few reference objects or none is neither 0 nor 1.
    The catalogue need not be the sample's population: C(z) = int p(x|z) S(x) dx depends on the population only
    through p(x|z), which the re-weighting assumes is the same everywhere. Send it as selection_completeness."""
    z, selected = np.asarray(z, np.float64), np.asarray(selected, bool)
    n, _ = np.histogram(z, edges)
    k, _ = np.histogram(z[selected], edges)
    return (k + 0.5) / (n + 1.0)


def population_nz(probs: np.ndarray, train: np.ndarray, max_iterations: int = EM_MAX_ITERATIONS,
                  tolerance: float = EM_TOLERANCE, completeness: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """The n(z) of a population from its PDFs (N, n_bins) by expectation-maximisation: each object's likelihood
    is its PDF over the training prior; the population's n(z) is the mean of the objects' posteriors under
    the current n(z), iterated from the training prior (the standard deconvolution, e.g. Padmanabhan et al.
    2005), with :data:`PSEUDO_COUNT` per bin. Returns the n(z) (probabilities) and the iterations taken.

    ``completeness``: the objects are a selection of their population, keeping C(z) of it at each z; the n(z)
    returned is then the parent population's. Its likelihood, sum_i log int p(x_i|z) n(z) dz - N log int C n dz,
    is flat wherever C is small (the sample holds no trace of that part of its parent), and the plain EM drifts
    there (0.7.0 on r < 17: PIT KS 0.021 after 8 iterations, 0.060 after 100). So the parent's n(z) is the
    maximum a posteriori under a Dirichlet prior centred on the training n(z), weighing
    :data:`SELECTION_PRIOR_WEIGHT` of the sample: each step n(z) = (S(z) + k pi_train(z)) / (k + N C(z) / <C>),
    S the posteriors summed, k the prior's weight, <C> the completeness averaged over n(z). Where the selection
    keeps much, this is the Horvitz-Thompson count S / C; where it keeps little, the training n(z). Zero where C
    is. The same iterations at most."""
    likelihood = np.asarray(probs, np.float64) / train[None, :]
    likelihood /= likelihood.sum(axis=1, keepdims=True)
    n, kept = len(likelihood), completeness
    nz = train.copy() if kept is None else train * (kept > 0) / (train * (kept > 0)).sum()
    for iteration in range(1, max_iterations + 1):
        posterior = likelihood * nz[None, :]
        total = posterior.sum(axis=1, keepdims=True)  # 0 for an object wholly where the selection keeps nothing
        posterior = np.divide(posterior, total, out=np.zeros_like(posterior), where=total > 0)
        if kept is None:
            new = (posterior.sum(axis=0) + PSEUDO_COUNT) / (n + PSEUDO_COUNT * len(nz))
        else:
            weight = SELECTION_PRIOR_WEIGHT * n
            new = (posterior.sum(axis=0) + weight * train) / (weight + n * kept / float(kept @ nz)) * (kept > 0)
            new /= new.sum()
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
    nz, iterations = population_nz(probs, train, completeness=prior.completeness)
    details = {**prior.details, "n_objects": int(len(probs)), "em_iterations": iterations}
    details.pop("min_objects", None)
    if prior.completeness is not None:  # the selected sample's own n(z), as the EM sees it
        details["sample_n_z"] = np.round(nz * prior.completeness / (nz * prior.completeness).sum(), 8).tolist()
    return Prior("self", nz, details, prior.completeness)


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
