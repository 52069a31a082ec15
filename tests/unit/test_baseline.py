"""The catalogue baselines: dereddening, kNN, and the local linear regression of Beck et al. (2016)."""
import numpy as np
import pytest

from photoz.model.conventions import BANDS, EXTINCTION_A_OVER_EBV, dereddened
from photoz.training.baselines import KNNPhotoZ, LocalLinearPhotoZ, catalogue_features


def linear_sky(n, seed):
    """Magnitudes whose redshift is a linear function of r and the colours, plus 0.002 of scatter."""
    rng = np.random.default_rng(seed)
    mags = rng.normal(18, 0.5, (n, 5))
    f = catalogue_features(mags)
    z = 0.1 + 0.03 * f[:, 1] - 0.02 * f[:, 3] + 0.01 * (f[:, 0] - 18) + rng.normal(0, 0.002, n)
    return mags, z


def test_local_linear_regression_recovers_a_linear_relation_where_neighbours_average_it_away():
    mags, z = linear_sky(6000, 0)
    llr = LocalLinearPhotoZ().fit(mags[:5000], z[:5000])
    z_hat, sigma = llr.predict(mags[5000:])
    assert np.std(z_hat - z[5000:]) < 0.0025 and np.median(sigma) == pytest.approx(0.005)  # the floor
    knn = KNNPhotoZ().fit(mags[:5000], z[:5000])
    z_knn = knn.predict_pdfs(mags[5000:]) @ knn.bins.centres
    assert np.std(z_knn - z[5000:]) > 1.5 * np.std(z_hat - z[5000:])
    pdfs = llr.predict_pdfs(mags[5000:])
    assert pdfs.shape == (1000, 180) and np.allclose(pdfs.sum(axis=1), 1)
    # a training set smaller than k uses all of it
    assert LocalLinearPhotoZ().fit(mags[:30], z[:30]).predict(mags[:5])[0].shape == (5,)


def test_dereddening_from_the_catalogues_extinction_or_from_ebv():
    mags = np.full((2, 5), 18.0)
    ebv = np.array([0.0, 0.1])
    from_ebv = dereddened(mags, ebv=ebv)
    assert np.allclose(from_ebv[1], 18.0 - 0.1 * np.array([EXTINCTION_A_OVER_EBV[b] for b in BANDS]))
    assert np.allclose(from_ebv[0], 18.0)
    assert np.allclose(dereddened(mags, extinction=np.full((2, 5), 0.2)), 17.8)
    with pytest.raises(ValueError, match="extinction"):
        dereddened(mags)


def test_extra_columns_join_the_neighbour_search():
    """Columns beyond r and the colours (a size, say) are standardised and searched alike: one that carries the
    redshift makes the neighbours' redshifts close to each object's own."""
    rng = np.random.default_rng(3)
    mags, z = rng.normal(18, 0.5, (3000, 5)), rng.uniform(0.0, 0.4, 3000)
    plain = KNNPhotoZ().fit(mags[:2500], z[:2500]).neighbour_redshifts(mags[2500:])
    informed = KNNPhotoZ().fit(mags[:2500], z[:2500], extra=z[:2500, None]).neighbour_redshifts(
        mags[2500:], extra=z[2500:, None])
    assert plain.shape == informed.shape == (500, 16)
    spread = [np.median(np.abs(np.median(nb, axis=1) - z[2500:])) for nb in (plain, informed)]
    assert spread[1] < 0.5 * spread[0]
