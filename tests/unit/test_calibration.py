"""What calibration can and cannot promise: an exact Bayesian posterior has uniform PIT overall and in bins of
anything observed (the photometric redshift), but not in bins of the true redshift, because conditioning on the
truth selects the objects whose noise pulled them away from it. This is why the model card checks the
per-bin PIT target in photometric-redshift bins and only reports the true-redshift ones."""
import numpy as np
import pytest

from photoz.model.pdf import RedshiftBins
from photoz.training.evaluation.evaluate import score


def exact_posteriors(n: int, sigma: float, seed: int = 1):
    """Galaxies drawn from a Main-Galaxy-Sample-like n(z) on the redshift grid, each observed as
    z + sigma (1 + z) x Gaussian noise, with the exact posterior p(z | observation) on the grid."""
    rng = np.random.default_rng(seed)
    bins = RedshiftBins.uniform()
    centres = bins.centres
    prior = centres ** 2 * np.exp(-(centres / 0.075) ** 1.5)
    prior /= prior.sum()
    z = rng.choice(centres, size=n, p=prior) + rng.uniform(-0.5, 0.5, n) * np.diff(bins.edges)[0]
    observed = z + sigma * (1 + z) * rng.normal(size=n)
    width = sigma * (1 + centres[None, :])
    likelihood = np.exp(-0.5 * ((observed[:, None] - centres[None, :]) / width) ** 2) / width
    posterior = likelihood * prior
    return posterior / posterior.sum(axis=1, keepdims=True), bins, z


@pytest.fixture(scope="module")
def exact_report():
    pdfs, bins, z = exact_posteriors(20_000, sigma=0.018)
    return score(pdfs, bins, z)


def test_an_exact_posterior_is_calibrated_overall(exact_report):
    assert exact_report["pit_ks"] < 0.02
    assert 0.66 <= exact_report["coverage_68"] <= 0.70
    assert 0.93 <= exact_report["coverage_95"] <= 0.97


def test_an_exact_posterior_is_calibrated_in_photometric_redshift_bins(exact_report):
    populated = [b for b in exact_report["by_photometric_redshift"] if b["n"] >= 500]
    assert len(populated) >= 4
    assert max(b["pit_ks"] for b in populated) < 0.05


def test_an_exact_posterior_is_not_uniform_in_true_redshift_bins(exact_report):
    """At the edges of n(z) the truth-conditioned PIT piles up: the posterior is pulled towards the bulk of the
    prior, so objects at low true z sit in their PDFs' lower tails (PIT near 0) and vice versa: KS far above
    0.05 with thousands of objects, for PDFs that are right by construction."""
    by_truth = {round(b["lo"], 2): b for b in exact_report["by_redshift"] if b["n"] >= 500}
    assert by_truth[0.0]["pit_ks"] > 0.2
    assert by_truth[0.0]["bias"] > 0.005  # low true z: estimates pulled up
    assert by_truth[0.2]["pit_ks"] > 0.1
    assert by_truth[0.2]["bias"] < -0.005  # high true z: pulled down


def _miscalibrated(pdfs: np.ndarray, bins: RedshiftBins) -> np.ndarray:
    """Exact posteriors spoiled the way a network's are: shifted up by two bins below z = 0.08 and widened
    (a second, broader copy mixed in) above z = 0.18, so the overall PIT hides most of it."""
    z_mean = pdfs @ bins.centres
    shifted = np.roll(pdfs, 2, axis=1)
    shifted[:, :2] = 0
    kernel = np.exp(-0.5 * (np.arange(-12, 13) / 6.0) ** 2)
    wide = np.apply_along_axis(lambda row: np.convolve(row, kernel / kernel.sum(), mode="same"), 1, pdfs)
    out = np.where((z_mean < 0.08)[:, None], shifted, pdfs)
    out = np.where((z_mean > 0.18)[:, None], 0.5 * out + 0.5 * wide, out)
    return out / out.sum(axis=1, keepdims=True)


def test_the_pit_map_fitted_on_one_sample_flattens_the_pit_of_another():
    from photoz.model.recalibration import fit_pit_map

    fit_pdfs, bins, fit_z = exact_posteriors(20_000, sigma=0.018, seed=2)
    test_pdfs, _, test_z = exact_posteriors(20_000, sigma=0.018, seed=3)
    pit_map = fit_pit_map(_miscalibrated(fit_pdfs, bins), bins, fit_z)
    before = score(_miscalibrated(test_pdfs, bins), bins, test_z)
    after = score(pit_map.apply(_miscalibrated(test_pdfs, bins), bins), bins, test_z)

    def worst(report):
        return max(b["pit_ks"] for b in report["by_photometric_redshift"] if b["n"] >= 500)

    assert worst(before) > 0.1
    assert worst(after) < 0.05
    assert after["crps"] < before["crps"]
    np.testing.assert_allclose(pit_map.apply(test_pdfs, bins).sum(axis=1), 1.0)


def test_an_identity_map_leaves_pdfs_alone_and_a_bad_table_is_refused():
    from photoz.model.recalibration import PITMap

    pdfs, bins, _ = exact_posteriors(200, sigma=0.02)
    identity = PITMap(np.array([0.05, 0.2]), np.tile(np.linspace(0, 1, 11), (2, 1)))
    np.testing.assert_allclose(identity.apply(pdfs, bins), pdfs, atol=1e-12)
    np.testing.assert_allclose(PITMap.from_metadata(identity.to_metadata()).table, identity.table, atol=1e-6)
    with pytest.raises(ValueError, match="monotonically"):
        PITMap(np.array([0.05, 0.2]), np.array([[0, 0.6, 0.4, 1.0], [0, 0.3, 0.6, 1.0]]))
    with pytest.raises(ValueError, match="increasing"):
        PITMap(np.array([0.2, 0.05]), np.tile(np.linspace(0, 1, 11), (2, 1)))
