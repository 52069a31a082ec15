"""Redshift priors (photoz.model.priors): re-weighting, the EM population n(z), validation."""
import numpy as np
import pytest

from photoz.model.pdf import ESTIMATES, RedshiftBins, point_estimates
from photoz.model.priors import (
    MIN_OBJECTS_SELF,
    SELECTION_PRIOR_WEIGHT,
    PriorError,
    apply,
    completeness_histogram,
    for_population,
    nz_record,
    population_nz,
    rebin,
    regularised,
    resolve,
    resolve_selection,
    reweight,
    training_nz,
)
from photoz.model.quality import FLAG_BITS, GRID_EDGE_FLAG

BINS = RedshiftBins.uniform(0.0, 0.4, 80)


def gaussian_rows(centres, sigma, bins=BINS):
    c = bins.centres
    rows = np.exp(-0.5 * ((c[None, :] - np.asarray(centres)[:, None]) / sigma) ** 2)
    return rows / rows.sum(axis=1, keepdims=True)


def draw(rng, n, pdf, sigma=0.02):
    """True redshifts drawn from ``pdf`` (per bin) and their noisy observations, what the toy network sees."""
    z = BINS.centres[rng.choice(BINS.n_bins, size=n, p=pdf)]
    return z, z + rng.normal(0, sigma, n)


def posteriors(observed, train_counts, sigma=0.02):
    """The PDFs a network trained on ``train_counts`` gives: a Gaussian likelihood times the training prior."""
    train = regularised(train_counts)
    posterior = gaussian_rows(observed, sigma) * train[None, :]
    return (posterior / posterior.sum(axis=1, keepdims=True)).astype(np.float32), train


def population(rng, n, train_counts, new_pdf, sigma=0.02):
    """Objects drawn from ``new_pdf`` (per bin) whose PDFs a network trained on ``train_counts`` would give."""
    z, observed = draw(rng, n, new_pdf, sigma)
    return (z, *posteriors(observed, train_counts, sigma))


def broad_and_narrow():
    c = BINS.centres
    train_counts = 1000 * np.exp(-0.5 * ((c - 0.12) / 0.06) ** 2)  # a training set centred at z 0.12
    shell = np.exp(-0.5 * ((c - 0.07) / 0.02) ** 2)  # the user's sample: a shell at z 0.07
    return train_counts, shell / shell.sum()


def test_the_training_prior_leaves_every_output_untouched():
    probs = gaussian_rows([0.1, 0.2], 0.02).astype(np.float32)
    outputs = {"probs": probs, **point_estimates(probs, BINS), "flag_bits": np.array([4, 0], np.uint32)}
    prior = resolve("train", BINS, regularised(np.ones(BINS.n_bins)))
    out, ok = apply(outputs, prior, None, BINS)
    assert out is outputs and ok.all()
    assert prior.describe() == {"name": "train", "recorded": True}


def test_a_custom_histogram_is_integrated_over_the_model_bins():
    mass = rebin(np.array([0.0, 0.2, 0.4]), np.array([3.0, 1.0]), BINS)
    assert mass.sum() == pytest.approx(1.0)
    assert mass[BINS.centres < 0.2].sum() == pytest.approx(0.75) and np.allclose(mass[:40], 0.75 / 40)
    # a histogram bin edge inside a model bin splits its mass by the overlap
    half = rebin(np.array([0.0, 0.0025, 1.0]), np.array([0.0, 1.0]), RedshiftBins.uniform(0.0, 0.4, 80))
    assert half[0] == pytest.approx(0.5 * half[1])


def test_reweighting_is_bayes_rule_and_refuses_objects_outside_the_prior():
    train = regularised(np.linspace(1, 100, BINS.n_bins))
    probs = gaussian_rows([0.1, 0.35], 0.01).astype(np.float32)
    prior = resolve("custom", BINS, train, edges=[0.0, 0.2], weights=[1.0])
    new, ok = reweight(probs, prior, train)
    assert ok.tolist() == [True, False]  # the second object's PDF lies where the prior is zero
    expected = probs[0] * prior.weights / train
    np.testing.assert_allclose(new[0], expected / expected.sum(), rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(new[1], probs[1])


def test_apply_recomputes_the_estimates_and_the_grid_edge_flag_only():
    train = regularised(np.ones(BINS.n_bins))
    probs = gaussian_rows([0.395, 0.2], 0.01).astype(np.float32)
    star = FLAG_BITS["point_source"]
    outputs = {"probs": probs, **point_estimates(probs, BINS, np.array([0.01, 0.02])),
               "flag_bits": np.array([FLAG_BITS[GRID_EDGE_FLAG] | star, star], np.uint32)}
    prior = resolve(None, BINS, train, edges=[0.0, 0.3], weights=[1.0])  # cuts the grid's upper end
    out, ok = apply(outputs, prior, train, BINS)
    assert ok.all()
    assert out["z_mean"][0] < outputs["z_mean"][0] - 0.05  # moved below 0.3
    assert out["flag_bits"][0] == star  # no longer at the grid's edge, the cutout's own flag kept
    np.testing.assert_array_equal(out["z_epistemic_std"], [0.01, 0.02])
    assert set(ESTIMATES) <= set(out)


def test_em_recovers_a_population_unlike_the_training_set(rng):
    train_counts, shell = broad_and_narrow()
    z, probs, train = population(rng, 3000, train_counts, shell)
    nz, iterations = population_nz(probs, train)
    assert 1 < iterations <= 8
    assert np.abs(nz - shell).max() < 0.01  # the shape, not only the mean (early stopping keeps it smooth)
    c = BINS.centres
    assert float(nz @ c) == pytest.approx(float(z.mean()), abs=0.003)
    # the training prior pulls every estimate towards z 0.12; the population's own n(z) removes that bias
    def bias(p):
        return float(np.mean(point_estimates(p, BINS)["z_mean"] - z))
    assert bias(probs) > 0.004
    prior = for_population(resolve("self", BINS, train), probs, train)
    assert prior.details["n_objects"] == 3000 and len(prior.describe()["n_z"]) == BINS.n_bins
    assert abs(bias(reweight(probs, prior, train)[0])) < 0.002
    truth = resolve(None, BINS, train, edges=BINS.edges, weights=shell)
    assert abs(bias(reweight(probs, truth, train)[0])) < 0.002


def test_prior_self_needs_enough_objects():
    train = regularised(np.ones(BINS.n_bins))
    probs = gaussian_rows(np.full(MIN_OBJECTS_SELF - 1, 0.1), 0.02)
    with pytest.raises(PriorError, match=f"at least {MIN_OBJECTS_SELF} valid objects"):
        for_population(resolve("self", BINS, train), probs, train)


def bias(probs, z):
    return float(np.mean(point_estimates(probs, BINS)["z_mean"] - z))


def cut_samples(rng, parent, n=6000, limit=0.1):
    """A sample of ``parent`` cut on what the toy network sees (observed z < ``limit``, as r < 17 is a cut on the
    photometry), its PDFs, the training prior, and the cut's declared selection measured on a reference
    catalogue of the training population (20,000 objects, 40 bins)."""
    train_counts, _ = broad_and_narrow()
    z_ref, observed_ref = draw(rng, 20000, regularised(train_counts))
    edges = np.linspace(0.0, 0.4, 41)
    selection = {"selection_edges": edges,
                 "selection_completeness": completeness_histogram(z_ref, observed_ref < limit, edges)}
    z, observed = draw(rng, n, parent)
    keep = observed < limit
    return z[keep], *posteriors(observed[keep], train_counts), selection


@pytest.mark.parametrize("parent", ["training", "shell"])
def test_a_declared_selection_stops_a_cut_from_being_counted_twice(rng, parent):
    train_counts, _ = broad_and_narrow()
    shell = np.exp(-0.5 * ((BINS.centres - 0.08) / 0.03) ** 2)  # a population unlike the training set's
    z, probs, train, selection = cut_samples(rng, regularised(train_counts) if parent == "training"
                                             else shell / shell.sum())
    truth = {"edges": BINS.edges, "weights": np.histogram(z, BINS.edges)[0] + 0.5}

    def under(**kwargs):
        name = kwargs.pop("name", None)
        prior = for_population(resolve(name, BINS, train, **kwargs), probs, train)
        return bias(reweight(probs, prior, train)[0], z), prior

    plain_self, _ = under(name="self")
    plain_truth, _ = under(**truth)
    selected_self, prior = under(name="self", **selection)
    selected_truth, _ = under(**truth, **selection)
    # the cut keeps p(z|x), so a prior swapped without the selection counts the cut twice: biased low
    assert plain_self < -0.004 and plain_truth < -0.002
    if parent == "training":  # and the training prior is the right one
        assert abs(bias(probs, z)) < 0.001
    # with it, the parent's n(z): the true one exactly, the EM's within its early stopping (as without a cut)
    assert abs(selected_truth) < 0.0006 and abs(selected_self) < (0.0015 if parent == "training" else 0.0025)
    assert abs(selected_self) < abs(plain_self) / 2 and abs(selected_truth) < abs(plain_truth) / 4
    described = prior.describe()
    assert described["selection"]["completeness"] == selection["selection_completeness"].tolist()
    assert sum(described["sample_n_z"]) == pytest.approx(1.0) and described["n_objects"] == len(z)
    # the selected sample's n(z) the EM sees is the parent's times C: its mean is the sample's mean redshift
    assert float(np.asarray(described["sample_n_z"]) @ BINS.centres) == pytest.approx(float(z.mean()), abs=0.003)


def test_the_selected_em_is_the_dirichlet_map_of_the_parent(rng):
    """At convergence the parent n(z) satisfies the stationarity condition of the selected likelihood plus the
    Dirichlet prior: S(z) + k pi_train(z) = n(z) (k + N C(z) / <C>); and zero where C is."""
    _, probs, train, selection = cut_samples(rng, regularised(broad_and_narrow()[0]), n=3000)
    completeness = resolve_selection(selection["selection_edges"], selection["selection_completeness"], BINS)
    completeness[-5:] = 0.0
    nz, _ = population_nz(probs, train, max_iterations=5000, tolerance=1e-13, completeness=completeness)
    likelihood = probs / train
    posterior = likelihood * nz
    posterior /= posterior.sum(axis=1, keepdims=True)
    k, n = SELECTION_PRIOR_WEIGHT * len(probs), len(probs)
    kept = completeness > 0
    lhs = posterior.sum(axis=0) + k * train
    rhs = nz * (k + n * completeness / float(completeness @ nz))
    scale = lhs[kept].sum() / rhs[kept].sum()  # both sides up to the normalisation of the update
    np.testing.assert_allclose(lhs[kept], scale * rhs[kept], rtol=1e-6)
    assert (nz[~kept] == 0).all() and (nz[kept] > 0).all()


def test_completeness_is_measured_with_half_an_object():
    z = np.array([0.05, 0.05, 0.05, 0.15, 0.25])
    selected = np.array([True, True, False, False, True])
    c = completeness_histogram(z, selected, np.array([0.0, 0.1, 0.2, 0.3, 0.4]))
    np.testing.assert_allclose(c, [2.5 / 4, 0.5 / 2, 1.5 / 2, 0.5 / 1])
    # as a request sends it: the mean over each model bin, zero outside the histogram
    per_bin = resolve_selection([0.0, 0.1, 0.2], [1.0, 0.5], BINS)
    assert per_bin[BINS.centres < 0.1] == pytest.approx(1.0) and (per_bin[BINS.centres > 0.2] == 0).all()
    straddling = resolve_selection([0.0, 0.0025, 0.4], [1.0, 0.0], BINS)  # a histogram edge inside bin 0
    assert straddling[0] == pytest.approx(0.5) and straddling[1] == 0.0


def test_a_selection_divides_a_custom_n_z_by_the_completeness():
    train = regularised(np.ones(BINS.n_bins))
    plain = resolve(None, BINS, train, edges=[0.0, 0.4], weights=[1.0])
    halved = resolve(None, BINS, train, edges=[0.0, 0.4], weights=[1.0], selection_edges=[0.0, 0.2, 0.3],
                     selection_completeness=[1.0, 0.5])
    expected = np.where(BINS.centres < 0.2, 1.0, np.where(BINS.centres < 0.3, 2.0, 0.0)) * plain.weights
    np.testing.assert_allclose(halved.weights, expected / expected.sum())
    assert halved.describe()["selection"] == {"edges": [0.0, 0.2, 0.3], "completeness": [1.0, 0.5]}


@pytest.mark.parametrize("kwargs, field, message", [
    ({"name": "uniform"}, "prior", "one of train, flat, self, custom"),
    ({"name": "custom", "edges": [0.0, 0.2]}, "prior_weights", "both prior_edges"),
    ({"edges": [0.2, 0.1], "weights": [1.0]}, "prior_edges", "strictly increasing"),
    ({"edges": [0.0, 0.1, 0.2], "weights": [1.0]}, "prior_weights", "2 weights"),
    ({"edges": [0.0, 0.1], "weights": [-1.0]}, "prior_weights", "non-negative"),
    ({"edges": [0.0, float("nan")], "weights": [1.0]}, "prior_edges", "finite"),
    ({"edges": ["a", "b"], "weights": [1.0]}, "prior_edges", "a list of numbers"),
    ({"edges": [0.5, 0.9], "weights": [1.0]}, "prior_edges", "overlapping the model's range"),
    ({"name": "train", "edges": [0.0, 0.1], "weights": [1.0]}, "prior", "only with prior=custom"),
    ({"name": "self", "edges": [0.0, 0.1], "weights": [1.0]}, "prior", "only with prior=custom"),
    ({"name": "flat", "selection_edges": [0.0, 0.4], "selection_completeness": [1.0]}, "selection_edges",
     "only with prior=self or a custom prior"),
    ({"name": "self", "selection_completeness": [1.0]}, "selection_edges", "both selection_edges"),
    ({"name": "self", "selection_edges": [0.0, 0.1, 0.1], "selection_completeness": [1.0, 1.0]},
     "selection_edges", "strictly increasing"),
    ({"name": "self", "selection_edges": [0.0, 0.4], "selection_completeness": [1.0, 1.0]},
     "selection_completeness", "1 fractions"),
    ({"name": "self", "selection_edges": [0.0, 0.4], "selection_completeness": [1.5]}, "selection_completeness",
     "0 <= C <= 1"),
    ({"name": "self", "selection_edges": [0.0, 0.4], "selection_completeness": [0.0]}, "selection_completeness",
     "not all 0"),
    ({"name": "self", "selection_edges": [0.5, 0.6], "selection_completeness": [1.0]}, "selection_edges",
     "overlapping the model's range"),
    ({"edges": [0.0, 0.1], "weights": [1.0], "selection_edges": [0.2, 0.4], "selection_completeness": [1.0]},
     "selection_edges", "keeps some redshift where the prior has weight"),
])
def test_bad_priors_name_the_field(kwargs, field, message):
    train = regularised(np.ones(BINS.n_bins))
    name = kwargs.pop("name", None)
    with pytest.raises(PriorError, match=message) as caught:
        resolve(name, BINS, train, **kwargs)
    assert caught.value.field == field


def test_a_bundle_without_its_training_nz_takes_only_the_training_prior():
    document = {"training": {"dataset": {}}}
    assert training_nz(document, BINS) is None
    assert resolve("train", BINS, None).describe() == {"name": "train", "recorded": False}
    with pytest.raises(PriorError, match="does not record its training set's n\\(z\\)"):
        resolve("flat", BINS, None)


def test_the_recorded_training_nz_round_trips(rng):
    z = rng.uniform(0, 0.45, 1000)
    record = nz_record(z, BINS, "test")
    assert record["n_objects"] == 1000 and record["outside_grid"] == int((z >= 0.4).sum())
    train = training_nz({"training": {"n_z": record}}, BINS)
    np.testing.assert_allclose(train, regularised(np.histogram(z, BINS.edges)[0]))
    assert training_nz({"training": {"n_z": {"counts": [1, 2]}}}, BINS) is None  # wrong length: ignored
