import numpy as np
import pytest
from scipy import integrate, stats

from photoz.model.pdf import (
    RedshiftBins,
    crps,
    interval_coverage,
    ks_uniform,
    outlier_fraction,
    photoz_metrics,
    pit,
    point_estimates,
    quantile,
    rail_point_metrics,
    sigma_mad,
)

BINS = RedshiftBins.uniform(0.0, 0.4, 180)


def test_grid_from_metadata_both_forms():
    assert BINS.n_bins == 180
    assert np.allclose(BINS.centres[:2], [0.4 / 360, 3 * 0.4 / 360])
    assert BINS.to_metadata() == {"z_min": 0.0, "z_max": 0.4, "n_bins": 180}
    assert np.allclose(RedshiftBins.from_metadata(BINS.to_metadata()).edges, BINS.edges)
    odd = RedshiftBins(np.array([0.0, 0.1, 0.15, 0.4]))
    assert odd.to_metadata() == {"edges": [0.0, 0.1, 0.15, 0.4]}
    assert np.allclose(RedshiftBins.from_metadata(odd.to_metadata()).edges, odd.edges)
    with pytest.raises(ValueError, match="increasing"):
        RedshiftBins(np.array([0.0, 0.2, 0.1]))


def test_delta_pdf_estimates_sit_at_the_bin_centre_not_the_left_edge():
    p = np.zeros(180)
    p[45] = 1.0  # bin [0.1, 0.10222)
    est = point_estimates(p, BINS)
    centre = 0.1 + 0.2 / 180
    assert est["z_mean"][0] == pytest.approx(centre)
    assert est["z_median"][0] == pytest.approx(centre)
    assert est["z_mode"][0] == pytest.approx(centre)
    # uniform inside one bin: std = width / sqrt(12)
    assert est["z_std"][0] == pytest.approx((0.4 / 180) / np.sqrt(12))
    assert est["z_lo95"][0] == pytest.approx(0.1 + 0.025 * 0.4 / 180)


def test_two_bin_hand_worked_example():
    bins = RedshiftBins(np.array([0.0, 1.0, 2.0]))
    p = np.array([[0.25, 0.75]])
    est = point_estimates(p, bins)
    assert est["z_mean"][0] == pytest.approx(0.25 * 0.5 + 0.75 * 1.5)  # 1.25
    # CDF: 0 at 0, 0.25 at 1, 1 at 2 -> median at 1 + (0.25 / 0.75)
    assert est["z_median"][0] == pytest.approx(1 + 1 / 3)
    assert est["z_mode"][0] == pytest.approx(1.5)
    # variance = E[z^2] - mean^2, uniform in each bin: E[z^2] = 0.25*(1/3) + 0.75*(7/3)
    assert est["z_std"][0] == pytest.approx(np.sqrt(0.25 / 3 + 0.75 * 7 / 3 - 1.25**2))


def test_estimates_match_scipy_on_a_finely_binned_gaussian():
    bins = RedshiftBins.uniform(0, 1, 2000)
    dist = stats.norm(0.43, 0.05)
    p = np.diff(dist.cdf(bins.edges))
    est = point_estimates(p, bins)
    assert est["z_mean"][0] == pytest.approx(0.43, abs=1e-6)
    assert est["z_std"][0] == pytest.approx(0.05, rel=1e-4)
    assert est["z_lo68"][0] == pytest.approx(dist.ppf(0.15865525), abs=1e-5)
    assert est["z_hi95"][0] == pytest.approx(dist.ppf(0.975), abs=1e-5)


def random_pdfs(rng, n):
    p = rng.gamma(0.3, size=(n, 180))
    return p / p.sum(axis=1, keepdims=True)


def test_quantiles_agree_with_an_independent_interpolation(rng):
    p = random_pdfs(rng, 50)
    for q in (0.025, 0.16, 0.5, 0.84, 0.975):
        mine = quantile(p, BINS, q)
        cdf = np.concatenate([[0], np.cumsum(p[0])])
        # scipy's piecewise-linear inverse of the CDF (strictly increasing here)
        assert mine[0] == pytest.approx(np.interp(q, cdf, BINS.edges), abs=1e-12)


def test_crps_matches_numerical_integration(rng):
    p = random_pdfs(rng, 20)
    z_true = np.concatenate([rng.uniform(0, 0.4, 18), [-0.05, 0.5]])  # two outside the grid
    exact = crps(p, BINS, z_true)
    for row, z, c in zip(p, z_true, exact, strict=True):
        cdf_edges = np.concatenate([[0], np.cumsum(row)])

        def integrand(x, cdf_edges=cdf_edges, z=z):
            return (np.interp(x, BINS.edges, cdf_edges) - (x >= z)) ** 2

        points = np.sort(np.concatenate([BINS.edges, [z]]))
        lo, hi = min(-0.1, z), max(0.6, z)
        num = integrate.quad(integrand, lo, hi, points=points[(points > lo) & (points < hi)], limit=1000)[0]
        assert c == pytest.approx(num, rel=1e-4, abs=1e-9)


def test_crps_of_a_delta_at_the_truth_is_tiny_and_grows_with_distance():
    p = np.zeros((2, 180))
    p[:, 90] = 1
    c = crps(p, BINS, np.array([BINS.centres[90], BINS.centres[90] + 0.1]))
    width = 0.4 / 180
    assert c[0] == pytest.approx(width / 12)  # integral of linear CDF ramp vs step at its middle
    assert c[1] == pytest.approx(0.1, rel=0.01)


def test_pit_and_ks_against_scipy(rng):
    # calibrated by construction: truths drawn from the PDFs themselves
    p = random_pdfs(rng, 2000)
    cdf = np.cumsum(p, axis=1)
    idx = np.array([np.searchsorted(c, u) for c, u in zip(cdf, rng.uniform(size=2000), strict=True)])
    z_true = BINS.edges[idx] + rng.uniform(size=2000) * BINS.widths[idx]
    values = pit(p, BINS, z_true)
    assert ks_uniform(values) == pytest.approx(stats.kstest(values, "uniform").statistic, abs=1e-12)
    assert ks_uniform(values) < 0.04
    shifted = pit(p, BINS, np.clip(z_true + 0.05, 0, 0.4))
    assert ks_uniform(shifted) > 0.1


def test_metrics_hand_worked():
    z_spec = np.array([0.1, 0.1, 0.1, 0.1, 0.1])
    z_phot = np.array([0.1, 0.111, 0.089, 0.1, 0.3])
    dz = (z_phot - z_spec) / 1.1
    # dz = [0, 0.01, -0.01, 0, 0.18]: median 0, |dz - 0| has median 0.01
    assert sigma_mad(dz) == pytest.approx(1.4826 * 0.01)
    assert outlier_fraction(dz) == pytest.approx(0.2)
    m = photoz_metrics(z_phot, z_spec)
    assert m["bias"] == pytest.approx(np.mean(dz))
    assert m["n"] == 5
    dz2 = np.array([-0.02, -0.01, 0.0, 0.01, 0.05, 0.051])
    med = np.median(dz2)
    assert sigma_mad(dz2) == pytest.approx(1.4826 * np.median(np.abs(dz2 - med)))
    assert sigma_mad(dz2) == pytest.approx(1.4826 * stats.median_abs_deviation(dz2))
    assert outlier_fraction(dz2) == pytest.approx(1 / 6)  # 0.05 itself is not an outlier


def test_rail_point_metrics_are_qps():
    """The DESC RAIL metrics as qp computes them (PointBias, PointSigmaIQR, PointOutlierRate), on a sample with
    a core, a tail and outliers on both sides."""
    from qp.metrics.point_estimate_metric_classes import PointBias, PointOutlierRate, PointSigmaIQR

    rng = np.random.default_rng(3)
    z_spec = rng.uniform(0.02, 0.35, 5000)
    z_phot = z_spec + (1 + z_spec) * np.concatenate([rng.normal(0.002, 0.015, 4700), rng.normal(0, 0.1, 300)])
    m = rail_point_metrics(z_phot, z_spec)
    assert m["rail_bias"] == pytest.approx(PointBias().evaluate(z_phot, z_spec), abs=1e-12)
    assert m["rail_sigma_iqr"] == pytest.approx(PointSigmaIQR().evaluate(z_phot, z_spec), abs=1e-12)
    assert m["rail_outlier_rate"] == pytest.approx(PointOutlierRate().evaluate(z_phot, z_spec), abs=1e-12)
    assert 0.03 < m["rail_outlier_rate"] < 0.07 and m["rail_bias"] == pytest.approx(0.002, abs=0.001)
    assert set(m) <= set(photoz_metrics(z_phot, z_spec))


def test_interval_coverage_of_calibrated_and_overconfident_pdfs():
    """Gaussian PDFs whose truth is drawn from them cover it 68% / 95% of the time; PDFs half as wide cover
    it far less often."""
    rng = np.random.default_rng(4)
    n, sigma = 4000, 0.02
    centre = rng.uniform(0.08, 0.32, n)
    z_true = centre + rng.normal(0, sigma, n)

    def gaussians(width):
        c = BINS.centres[None, :]
        p = np.exp(-0.5 * ((c - centre[:, None]) / width) ** 2)
        return p / p.sum(axis=1, keepdims=True)

    calibrated = gaussians(sigma)
    assert interval_coverage(calibrated, BINS, z_true, 0.68) == pytest.approx(0.68, abs=0.025)
    assert interval_coverage(calibrated, BINS, z_true, 0.95) == pytest.approx(0.95, abs=0.015)
    narrow = gaussians(sigma / 2)
    assert interval_coverage(narrow, BINS, z_true, 0.68) < 0.45
    m = photoz_metrics(point_estimates(calibrated, BINS)["z_mean"], z_true, calibrated, BINS)
    assert m["coverage_68"] == interval_coverage(calibrated, BINS, z_true, 0.68)
    assert m["coverage_95"] == interval_coverage(calibrated, BINS, z_true, 0.95)
