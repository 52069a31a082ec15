"""Temperature scaling: the fit recovers a known over-confidence and never makes the likelihood worse."""
import numpy as np
import pytest

from photoz.training.release.temperature import fit_temperature, nll


def _sample(rng, n=6000, n_bins=60):
    """True PDFs as Gaussian bumps in logit space; labels drawn from them."""
    centres = rng.uniform(5, n_bins - 5, n)
    widths = rng.uniform(1.5, 4.0, n)
    logits = -0.5 * ((np.arange(n_bins)[None, :] - centres[:, None]) / widths[:, None]) ** 2
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(n_bins, p=row) for row in p])
    return logits, labels


@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0])
def test_fit_recovers_the_scale_of_mis_scaled_logits(scale):
    logits, labels = _sample(np.random.default_rng(1))
    t = fit_temperature(scale * logits, labels)
    assert t == pytest.approx(scale, rel=0.08)
    assert nll(scale * logits, labels, t) <= nll(scale * logits, labels, 1.0) + 1e-12


def test_nll_is_the_mean_negative_log_probability_of_the_true_bin():
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]]))
    assert nll(logits, np.array([0, 2]), 1.0) == pytest.approx(-np.mean(np.log([0.7, 0.5])))
