"""Physics checks of the simulator that can be checked."""
import h5py
import numpy as np
import pytest

from photoz.model.conventions import (
    BANDS,
    DEPTH_5SIGMA_MAG,
    PIXEL_SCALE_ARCSEC,
    mag_to_nanomaggies,
    sky_sigma_nmgy_per_pixel,
)
from photoz.training.sim.population import PopulationConfig, draw_candidates, draw_selected, rest_frame_r
from photoz.training.sim.render import _galaxy_components, _gsparams, add_noise, draw, draw_bands, noise_sigma
from photoz.training.sim.sed import TemplateTuning, k_corrections

R = BANDS.index("r")


def test_elliptical_reddens_with_redshift():
    z = np.linspace(0.02, 0.38, 10)
    k = k_corrections(np.zeros(z.size), np.zeros(z.size), z)
    g_r = k[:, 1] - k[:, 2]
    assert np.all(np.diff(g_r) > 0)
    assert g_r[-1] - g_r[0] > 0.6
    # CWW E at z ~ 0.035: g - r about 0.87 (redder than the real red sequence: hence the calibration)
    assert k_corrections([0.0], [0.0], [0.035])[0, 1] - k_corrections([0.0], [0.0], [0.035])[0, 2] == \
        pytest.approx(0.87, abs=0.02)


def test_selection_cut_holds_and_median_redshift_is_mgs_like():
    pop = draw_selected(PopulationConfig(), 5000, np.random.default_rng(0))
    assert np.all(pop["mag_true"][:, R] < 17.77)
    assert 0.09 < np.median(pop["z"]) < 0.11  # SDSS MGS: 0.10
    # the parent population reaches below the cut: the cut is doing the selecting
    parent = draw_candidates(PopulationConfig(), 5000, np.random.default_rng(0))
    assert np.mean(parent["mag_true"][:, R] >= 17.77) > 0.2


def test_luminosity_function_band_is_converted_to_rest_frame_r_with_each_sed():
    """Blanton's ^{0.1}r: a galaxy at z = 0.1 has K = -2.5 log10(1.1) in it, so M_0.1r - M_r = K_r(0.1) + 0.1035."""
    t, dust = np.array([0.0, 2.5]), np.zeros(2)
    k_r = k_corrections(t, dust, np.full(2, 0.1))[:, R]
    rest = rest_frame_r(np.array([-21.0, -21.0]), 0.1, np.ones(2), t, t, dust, TemplateTuning())
    np.testing.assert_allclose(-21.0 - rest, k_r + 2.5 * np.log10(1.1), atol=1e-9)
    assert (-21.0 - rest[0]) > (-21.0 - rest[1]) > 0  # a red spectrum is fainter in the bluer ^{0.1}r band
    same = rest_frame_r(np.array([-20.0]), 0.0, np.ones(1), t[:1], t[:1], dust[:1], TemplateTuning())
    np.testing.assert_array_equal(same, [-20.0])


def test_red_sequence_colour_magnitude_relation():
    """The relation reddens red galaxies brighter than its pivot, by more the brighter they are, and no others
    (same seed: the same galaxies with and without it)."""
    def g_r(cfg):
        pop = draw_candidates(cfg, 40000, np.random.default_rng(4))
        return pop, pop["mag_true"][:, 1] - pop["mag_true"][:, 2]

    pop, with_relation = g_r(PopulationConfig())
    _, without = g_r(PopulationConfig(red_sequence_ebv_per_mag=0.0))
    m, red, pivot = pop["abs_mag_lf_band"], pop["red"].astype(bool), PopulationConfig().red_sequence_pivot_mag
    redder = with_relation - without
    np.testing.assert_array_equal(redder[~red | (m > pivot)], 0.0)
    assert np.median(redder[red & (m < pivot - 1.0)]) > np.median(redder[red & (m < pivot) & (m > pivot - 0.5)]) > 0.005
    assert np.median(redder[red & (m < pivot - 1.0)]) > 0.03


def test_red_fraction_rises_with_luminosity():
    pop = draw_candidates(PopulationConfig(), 20000, np.random.default_rng(1))
    bright, faint = pop["abs_mag_r"] < -21.5, pop["abs_mag_r"] > -19.5
    assert pop["red"][bright].mean() > pop["red"][faint].mean() + 0.3


def test_blank_sky_noise_matches_configured_depth():
    noisy = add_noise(np.zeros((200, 5, 64, 64), np.float32), np.random.default_rng(2))
    for b, band in enumerate(BANDS):
        assert noisy[:, b].std() == pytest.approx(sky_sigma_nmgy_per_pixel(band), rel=0.01)


def test_point_source_at_the_depth_is_detected_at_about_5_sigma():
    """PSF-weighted flux of a star of the 5-sigma depth magnitude has S/N ~ 5 at median seeing."""
    from photoz.model.conventions import MEDIAN_SEEING_FWHM_ARCSEC

    for band in ("r", "z"):
        flux = mag_to_nanomaggies(DEPTH_5SIGMA_MAG[band])
        psf = draw([__import__("galsim").DeltaFunction(flux=1.0)], MEDIAN_SEEING_FWHM_ARCSEC[band])
        weights = psf / np.sum(psf**2)  # optimal linear estimator of the flux
        sigma = sky_sigma_nmgy_per_pixel(band) * np.sqrt(np.sum(weights**2))
        assert flux / sigma == pytest.approx(5.0, rel=0.15)


def fit_moffat_fwhm_arcsec(image: np.ndarray) -> float:
    """FWHM of a least-squares 2-D Moffat (beta 3.5) fitted to pixel values, independent of GalSim."""
    from scipy.optimize import curve_fit

    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]

    def moffat(coords, amplitude, fwhm, x0, y0):
        alpha = fwhm / (2 * np.sqrt(2 ** (1 / 3.5) - 1))
        r2 = (coords[0] - x0) ** 2 + (coords[1] - y0) ** 2
        return amplitude * (1 + r2 / alpha**2) ** -3.5

    p0 = (image.max(), 3.0, image.shape[1] / 2, image.shape[0] / 2)
    params, _ = curve_fit(moffat, (xx.ravel(), yy.ravel()), image.ravel(), p0=p0)
    return params[1] * PIXEL_SCALE_ARCSEC


def test_star_fwhm_matches_drawn_seeing():
    import galsim

    for fwhm_arcsec in (1.0, 1.4, 2.0):
        image = draw([galsim.DeltaFunction(flux=100.0)], fwhm_arcsec)
        measured = fit_moffat_fwhm_arcsec(image)
        # the pixel response broadens the star by a few per cent at most
        assert fwhm_arcsec <= measured < fwhm_arcsec * 1.05


def test_all_bands_at_once_equal_galsim_drawing_each_band():
    """draw_bands (k-images of the components drawn once per object) gives GalSim's per-band FFT drawing:
    galaxies of every kind, a neighbour star, a different PSF per band."""
    import galsim

    rng = np.random.default_rng(3)
    pop = draw_selected(PopulationConfig(), 12, rng)
    for k in range(12):
        row = {key: value[k] for key, value in pop.items()}
        components, fluxes = _galaxy_components(galsim, row, *rng.normal(0, 0.3, 2))
        components.append(galsim.DeltaFunction(gsparams=_gsparams()).shift(9.0, -6.0))
        fluxes = np.concatenate([fluxes, rng.uniform(20, 200, (5, 1))], axis=1)
        fwhm = np.array([1.5, 1.4, 1.3, 1.25, 1.3]) * np.exp(rng.normal(0, 0.1, 5))
        together = draw_bands(components, fluxes, fwhm)
        for b in range(len(BANDS)):
            alone = draw([c * float(f) for c, f in zip(components, fluxes[b], strict=True)], fwhm[b])
            # same k-grid: float rounding; a larger grid than GalSim's own choice: within its folding accuracy
            assert np.abs(together[b] - alone).max() < 2e-3 * alone.max(), (k, b)
            assert together[b].sum() == pytest.approx(alone.sum(), rel=1e-3)


def test_source_poisson_noise_adds_to_sky():
    clean = np.zeros((1, 5, 64, 64), np.float32)
    clean[0, :, 32, 32] = 1000.0
    sigma = noise_sigma(clean)
    assert np.all(sigma[0, :, 32, 32] > 2 * sigma[0, :, 0, 0])


@pytest.fixture(scope="module")
def small_sim(tmp_path_factory):
    from photoz.training.sim.simulate import simulate

    path = tmp_path_factory.mktemp("sim") / "a.h5"
    simulate(path, 96, seed=11, workers=2, chunk_size=32, progress=False)
    return path


def test_same_seed_gives_identical_files_whatever_the_workers(small_sim, tmp_path):
    from photoz.training.sim.simulate import simulate

    other = simulate(tmp_path / "b.h5", 96, seed=11, workers=1, chunk_size=32, progress=False)
    with h5py.File(small_sim) as a, h5py.File(other) as b:
        names = []
        a.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        for name in names:
            assert np.array_equal(a[name][:], b[name][:]), name
    different = simulate(tmp_path / "c.h5", 32, seed=12, workers=1, chunk_size=32, progress=False)
    with h5py.File(small_sim) as a, h5py.File(different) as c:
        assert not np.array_equal(a["z"][:32], c["z"][:32])


def test_resume_and_extend_reproduce_a_single_run(small_sim, tmp_path):
    from photoz.training.sim.simulate import SimulationMismatch, simulate

    path = tmp_path / "grow.h5"
    simulate(path, 40, seed=11, workers=1, chunk_size=32, progress=False)  # 1 full + 1 partial chunk
    simulate(path, 96, seed=11, workers=2, chunk_size=32, progress=False)
    with h5py.File(small_sim) as a, h5py.File(path) as b:
        assert b["images"].shape[0] == 96
        assert np.array_equal(a["images"][:], b["images"][:])
        assert np.array_equal(a["catalogue/petro_mag"][:], b["catalogue/petro_mag"][:])
    with pytest.raises(SimulationMismatch, match="seed"):
        simulate(path, 128, seed=99, workers=1, chunk_size=32, progress=False)


def test_file_layout_units_and_attributes(small_sim):
    with h5py.File(small_sim) as h5:
        assert h5["images"].shape == (96, 5, 64, 64) and h5["images"].dtype == np.float32
        assert h5.attrs["bands"] == "u,g,r,i,z"
        assert h5.attrs["pixel_scale_arcsec"] == pytest.approx(0.396)
        assert h5.attrs["flux_unit"] == "nanomaggy"
        assert h5.attrs["seed"] == 11 and "population_config" in h5.attrs
        z, ebv = h5["z"][:], h5["ebv"][:]
        assert np.all((z > 0) & (z < 0.4)) and np.all((ebv > 0) & (ebv < 0.31))
        assert np.all(h5["truth/mag_true"][:, R] < 17.77)
        # catalogue Petrosian r tracks the true total magnitude (Petrosian misses a little light)
        dm = h5["catalogue/petro_mag"][:, R] - h5["truth/mag_true"][:, R]
        assert abs(np.median(dm)) < 0.2
        # total flux in the image equals the catalogue's model flux for isolated galaxies
        isolated = h5["truth/n_neighbours"][:] == 0
        image_flux = h5["images"][:].sum(axis=(2, 3))[isolated, R]
        true_flux = mag_to_nanomaggies(h5["truth/mag_true"][:, R][isolated])
        assert np.median(image_flux / true_flux) == pytest.approx(1.0, abs=0.1)


def test_calibration_transfer_matrix_and_error_comparison_on_real_galaxies_standing_in_for_simulated():
    """With real galaxies in place of simulated ones the report must say 'the same': error ratios of exactly 1,
    and transfer ratios near 1 for both magnitude kinds and both catalogue methods."""
    from photoz.training.sim.calibrate import error_comparison, load_real, transfer_matrix

    real = load_real("train")
    errors = error_comparison({"model_mags": real["mags"], "model_errs": real["errs"]})
    assert set(errors) == set("ugriz") and all(errors[b] for b in "gri")
    assert all(row["ratio"] == 1.0 for rows in errors.values() for row in rows)
    valid = load_real("valid")
    matrix = transfer_matrix({"z": valid["z"], "petro_mags": valid["mags"], "model_mags": valid["mags"]})
    assert set(matrix) == {"petro/KNN", "petro/LocalLinear", "model/KNN", "model/LocalLinear"}
    for name, row in matrix.items():  # a smaller real training set: a little worse, not a different sky
        assert 0.9 < row["sigma_mad_ratio"] < 1.3 and abs(row["bias"]) < 0.005, (name, row)
