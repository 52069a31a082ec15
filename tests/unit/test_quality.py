"""Quality and out-of-distribution flags (photoz.model.quality): each flag on cutouts made to trip it.

The "training set" here is synthetic (tests.helpers.disk_galaxies: exponential disks through a Gaussian PSF
with sky noise, numpy only), so the thresholds come from a known population.
"""
import numpy as np
import pytest

from photoz.model.conventions import BANDS, PIXEL_SCALE_ARCSEC
from photoz.model.features import FEATURES_VERSION, IDENTICAL_RUN_PIXELS, cutout_features
from photoz.model.quality import (
    FLAG_BITS,
    FLAG_NAMES,
    OOD_FLAGS,
    QualityFlagger,
    bits_from_names,
    flag_bits_from_features,
    flag_names,
    quality_metadata,
    reference_thresholds,
    usable_thresholds,
)
from tests.helpers import SIGMA, disk_galaxies, star

# one pytest-xdist worker runs this module (make test), so its module fixtures (reference, ...) are built once
pytestmark = pytest.mark.xdist_group("test_quality")


@pytest.fixture(scope="module")
def reference():
    rng = np.random.default_rng(7)
    images, ebv = disk_galaxies(rng, 3000)
    features = cutout_features(images, ebv, BANDS, PIXEL_SCALE_ARCSEC)
    return quality_metadata(features, {"dataset": "synthetic disks"})


def _flags(images, ebv, quality) -> list[list[str]]:
    flagger = QualityFlagger(BANDS, PIXEL_SCALE_ARCSEC, quality)
    probs = np.full((len(images), 180), 1 / 180, np.float32)
    return flag_names(flagger.flag_bits(images, ebv, probs))


def _share(flags, name) -> float:
    return float(np.mean([name in f for f in flags]))


def test_in_range_objects_are_rarely_flagged(reference):
    images, ebv = disk_galaxies(np.random.default_rng(8), 1500)
    flags = _flags(images, ebv, reference)
    assert np.mean([any(f in OOD_FLAGS for f in row) for row in flags]) <= 0.03


def test_r_magnitude_and_snr_measure_what_was_put_in():
    rng = np.random.default_rng(1)
    images, ebv = disk_galaxies(rng, 200, r_mag=(16.0, 16.0), scale_px=(1.5, 2.0), noise=False)
    f = cutout_features(images, ebv, BANDS, PIXEL_SCALE_ARCSEC)
    # a 6" aperture holds nearly all the light of a small disk: within 0.05 mag of the total
    assert np.all(np.abs(f["r_mag"] - 16.0) < 0.05)
    sky = rng.normal(0, 1, images.shape).astype(np.float32) * SIGMA[None, :, None, None]
    f = cutout_features(sky, ebv, BANDS, PIXEL_SCALE_ARCSEC)
    assert abs(np.median(f["snr_r"])) < 0.3  # no source: no signal


def test_background_sigma_is_the_sky_sigma():
    rng = np.random.default_rng(2)
    images, ebv = disk_galaxies(rng, 100)
    from photoz.model.features import sky_background

    level, sigma = sky_background(images, PIXEL_SCALE_ARCSEC)
    np.testing.assert_allclose(np.median(sigma, axis=0), SIGMA, rtol=0.05)
    assert np.all(np.abs(np.median(level, axis=0)) < 0.1 * SIGMA)


def test_ebv_flux_and_snr_beyond_the_training_range_are_flagged(reference):
    rng = np.random.default_rng(3)
    t = reference["thresholds"]
    images, ebv = disk_galaxies(rng, 50)
    assert _share(_flags(images, np.full(50, 2 * t["ebv_max"]), reference), "ebv_above_training") == 1
    bright, _ = disk_galaxies(rng, 50, r_mag=(12.0, 12.5))
    assert _share(_flags(bright, ebv, reference), "r_above_training") == 1
    faint, _ = disk_galaxies(rng, 50, r_mag=(20.0, 20.5))
    flags = _flags(faint, ebv, reference)
    assert _share(flags, "r_below_training") >= 0.9 and _share(flags, "low_snr") >= 0.9
    noisy = images + rng.normal(0, 1, images.shape).astype(np.float32) * 30 * SIGMA[None, :, None, None]
    assert _share(_flags(noisy, ebv, reference), "low_snr") >= 0.9


def test_stars_are_point_sources_and_galaxies_are_not(reference):
    rng = np.random.default_rng(4)
    stars = np.concatenate([star(rng, rng.uniform(15, 17.5), rng.uniform(1.2, 1.6)) for _ in range(40)])
    assert _share(_flags(stars, np.full(40, 0.03), reference), "point_source") >= 0.9
    big, ebv = disk_galaxies(rng, 40, scale_px=(3.0, 5.0))
    assert _share(_flags(big, ebv, reference), "point_source") == 0


def test_a_star_in_poor_seeing_is_told_from_compact_galaxies_in_good_seeing():
    """The wings, not the core: a star seen through a 1.8" PSF has a broader core than a compact galaxy seen
    through a 1.0" one, but no light outside its PSF (the concentration is the flux within 2.4" over 3.2")."""
    rng = np.random.default_rng(11)
    images, ebv = disk_galaxies(rng, 3000, scale_px=(1.2, 5.0), psf_fwhm_arcsec=(1.0, 1.8))
    quality = quality_metadata(cutout_features(images, ebv, BANDS, PIXEL_SCALE_ARCSEC), {"dataset": "disks"})
    stars = np.concatenate([star(rng, rng.uniform(15, 17.5), rng.uniform(1.7, 1.8)) for _ in range(40)])
    assert _share(_flags(stars, np.full(40, 0.03), quality), "point_source") >= 0.9
    compact, ebv = disk_galaxies(rng, 200, scale_px=(1.5, 2.0), psf_fwhm_arcsec=(1.0, 1.2))
    assert _share(_flags(compact, ebv, quality), "point_source") <= 0.02  # (a 0.8" core: stars 10%, these 0%)


def test_an_equal_companion_is_a_blend(reference):
    rng = np.random.default_rng(5)
    images, ebv = disk_galaxies(rng, 40, r_mag=(15.5, 16.5), scale_px=(1.5, 2.5))
    companions = np.roll(images, (0, 7), axis=(2, 3))  # 2.8" to the side, as bright
    assert _share(_flags(images + 0.8 * companions, ebv, reference), "blend") >= 0.9
    assert _share(_flags(images, ebv, reference), "blend") <= 0.05


def test_masked_pixels_need_a_run_of_identical_values(reference):
    rng = np.random.default_rng(6)
    images, ebv = disk_galaxies(rng, 3)
    images[0, 1, 10:12, :] = 0.0  # a zero-filled strip in g
    images[1, 4, 5, 20:20 + IDENTICAL_RUN_PIXELS - 1] = 1.25  # one pixel short of a run
    images[2, 0, 30:30 + IDENTICAL_RUN_PIXELS, 3] = -7.0  # a column of a fill value in u
    flags = _flags(images, ebv, reference)
    assert ["masked_pixels" in f for f in flags] == [True, False, True]


def test_a_flat_topped_peak_is_saturated(reference):
    rng = np.random.default_rng(9)
    images, ebv = disk_galaxies(rng, 2, r_mag=(13.5, 13.5), scale_px=(1.5, 1.5))
    level = 0.5 * images[0].max(axis=(1, 2))
    images[0] = np.minimum(images[0], level[:, None, None])
    flags = _flags(images, ebv, reference)
    assert "saturated" in flags[0] and "saturated" not in flags[1]


def test_the_pdf_flag_needs_no_cutout_features():
    probs = np.zeros((2, 180), np.float32)
    probs[0, -1] = 1.0
    probs[1, 50] = 1.0
    flagger = QualityFlagger(BANDS, PIXEL_SCALE_ARCSEC, None)
    images, ebv = disk_galaxies(np.random.default_rng(0), 2)
    assert flag_names(flagger.flag_bits(images, ebv, probs)) == [["pdf_at_grid_edge"], []]


def test_without_thresholds_only_the_fixed_flags_are_set(reference):
    images, ebv = disk_galaxies(np.random.default_rng(10), 5, r_mag=(11.0, 11.5))
    images[0, 2, :, 40:44] = 0.0
    flags = _flags(images, np.full(5, 5.0), None)  # far too bright, E(B-V) 5: unknown without thresholds
    assert flags[0] == ["masked_pixels"] and all(f == [] for f in flags[1:])
    stale = {**reference, "features_version": FEATURES_VERSION + 1}
    assert usable_thresholds(stale) is None
    assert _flags(images[1:], np.full(4, 5.0), stale) == [[]] * 4


def test_binned_thresholds_follow_the_magnitude():
    rng = np.random.default_rng(11)
    n = 20000
    r_mag = rng.uniform(14, 18, n)
    features = {"ebv": rng.uniform(0, 0.1, n), "r_mag": r_mag, "snr_r": rng.uniform(50, 500, n),
                "concentration": 0.1 + 0.05 * (r_mag - 14) + rng.uniform(0, 0.02, n),
                "asymmetry": rng.uniform(0, 0.1, n), "identical_run": np.zeros(n, bool), "plateau": np.zeros(n)}
    t = reference_thresholds(features)
    limits = t["by_r_mag"]["concentration_max"]
    assert np.all(np.diff(limits) > 0) and limits[0] < 0.2 < limits[-1]
    # a value typical at r = 18 is out of range at r = 14.5, fine at 17.8
    probe = {**{k: v[:2] for k, v in features.items()}, "r_mag": np.array([14.5, 17.8]),
             "concentration": np.array([0.3, 0.3]), "ebv": np.array([0.05, 0.05]),
             "snr_r": np.array([100.0, 100.0]), "asymmetry": np.array([0.05, 0.05])}
    assert flag_names(flag_bits_from_features(probe, t)) == [["point_source"], []]


def test_flag_names_and_bits_round_trip():
    assert FLAG_NAMES[0] == "pdf_at_grid_edge" and len(set(FLAG_BITS.values())) == len(FLAG_NAMES)
    bits = np.array([0, FLAG_BITS["blend"] | FLAG_BITS["low_snr"], FLAG_BITS["pdf_at_grid_edge"]], np.uint32)
    names = flag_names(bits)
    assert names == [[], ["blend", "low_snr"], ["pdf_at_grid_edge"]]
    np.testing.assert_array_equal(bits_from_names(names), bits)
    np.testing.assert_array_equal(bits_from_names(["", "blend,low_snr", "pdf_at_grid_edge,unknown"]), bits)


def test_the_blend_detector_learns_companions_from_the_training_set_and_flags_them():
    """photoz.training.release.blend: a small network trained on the reference galaxies alone and with another of them
    added 1.5-3" away sees new pairs the asymmetry misses; its score's threshold is the galaxies' tail, it
    travels in the metadata (ONNX, base64) and the flagger runs it from there."""
    import base64

    from photoz.model.features import BlendNet, blend_input, sky_background
    from photoz.training.release.blend import train_blend_net
    from photoz.training.simulation.companions import add_companions

    rng = np.random.default_rng(31)
    images, ebv = disk_galaxies(rng, 1200, r_mag=(15.0, 17.0))
    features = cutout_features(images, ebv, BANDS, PIXEL_SCALE_ARCSEC)
    blended, _ = add_companions(images, features["r_mag"], sky_background(images, PIXEL_SCALE_ARCSEC)[0], rng)
    detector = train_blend_net(blend_input(images, BANDS, PIXEL_SCALE_ARCSEC),
                               blend_input(blended, BANDS, PIXEL_SCALE_ARCSEC), seed=0, epochs=6)
    features["blend_score"] = BlendNet(detector).scores(blend_input(images, BANDS, PIXEL_SCALE_ARCSEC))
    quality = quality_metadata(features, {"dataset": "disks"},
                               blend_net={"onnx_base64": base64.b64encode(detector).decode()})
    assert "blend_score_max" in quality["thresholds"]
    new, new_ebv = disk_galaxies(np.random.default_rng(32), 300, r_mag=(15.0, 17.0))
    new_features = cutout_features(new, new_ebv, BANDS, PIXEL_SCALE_ARCSEC)
    pairs, _ = add_companions(new, new_features["r_mag"], sky_background(new, PIXEL_SCALE_ARCSEC)[0],
                              np.random.default_rng(33))
    assert _share(_flags(pairs, new_ebv, quality), "blend") >= 0.8
    assert _share(_flags(new, new_ebv, quality), "blend") <= 0.03
    without = {k: v for k, v in quality.items() if k != "blend_net"}  # the asymmetry alone sees fewer
    assert _share(_flags(pairs, new_ebv, without), "blend") < _share(_flags(pairs, new_ebv, quality), "blend")


def _naive_identical_run(image: np.ndarray, length: int) -> bool:
    """``length`` equal values in a row or a column of any band, pixel by pixel."""
    for band in image:
        for lines in (band, band.T):
            for line in lines:
                count = 1
                for a, b in zip(line[:-1], line[1:], strict=True):
                    count = count + 1 if a == b else 1
                    if count >= length:
                        return True
    return False


@pytest.mark.parametrize("implementation", ["numpy", "numba"])
def test_identical_runs_and_plateaus_match_their_definitions_pixel_by_pixel(implementation):
    """The screened run search (pairs a half-run apart first) and the bright-band plateau count give what the
    definitions give on every cutout, in the numpy reference and compiled alike: runs of 6-9 equal pixels along
    rows and columns at many offsets, plateaus in some bands only."""
    from photoz.model import features, features_jit
    from photoz.model.features import (
        IDENTICAL_RUN_PIXELS,
        PLATEAU_FRACTION,
        PLATEAU_MIN_PEAK_SIGMA,
        PLATEAU_NOISE_SIGMA,
        sky_background,
    )

    cutout_features = features.cutout_features if implementation == "numpy" else features_jit.cutout_features

    rng = np.random.default_rng(5)
    images = rng.normal(0, 0.05, (48, 5, 64, 64)).astype(np.float32)
    for k in range(0, 48, 2):
        band, length, start, line = k % 5, 6 + (k // 2) % 4, rng.integers(0, 64 - 9), rng.integers(0, 64)
        if (k // 2) % 3 == 0:
            images[k, band, line, start:start + length] = 1.5
        else:
            images[k, band, start:start + length, line] = -0.25
    images[::3, 2, 30:34, 30:34] = 40.0  # flat tops in r, far above the sky
    images[1::3, 3, 31, 31] = 40.0  # single bright pixels in i
    features = cutout_features(images, np.zeros(48), ("u", "g", "r", "i", "z"), 0.396)
    expected = np.array([_naive_identical_run(image, IDENTICAL_RUN_PIXELS) for image in images])
    assert 0 < expected.sum() < len(images)
    np.testing.assert_array_equal(features["identical_run"], expected)

    background, sigma = sky_background(images, 0.396)
    peak = images.max(axis=(2, 3)) - background
    level = background + peak - np.maximum(PLATEAU_FRACTION * peak, PLATEAU_NOISE_SIGMA * sigma)
    counts = (images >= level[:, :, None, None].astype(np.float32)).sum(axis=(2, 3))
    reference = np.where(peak > PLATEAU_MIN_PEAK_SIGMA * np.maximum(sigma, 1e-12), counts, 0).max(axis=1)
    assert set(np.unique(reference)) >= {0, 1, 16}
    np.testing.assert_array_equal(features["plateau"], reference)


class RecordingBlendNet:
    """Stands in for the blend detector: keeps the input it is given, scores each cutout by its input's sum."""

    def scores(self, x):
        self.x = x.copy()
        return x.reshape(len(x), -1).sum(axis=1, dtype=np.float64)


def test_the_compiled_features_are_the_numpy_reference_features(reference):
    """photoz.model.features_jit (what the flagger runs) against photoz.model.features (the definitions the
    thresholds were measured with) on galaxies, stars, masked and saturated cutouts and blank sky: every feature
    within 1e-4 relative (the reference sums float32 products, the compiled code float64), the blend
    detector's input within 1e-4, and the flags identical."""
    from photoz.model import features_jit
    from photoz.model.features import blend_input

    rng = np.random.default_rng(12)
    galaxies, ebv = disk_galaxies(rng, 400)
    stars = np.concatenate([star(rng, r_mag=float(m)) for m in rng.uniform(15, 19, 40)])
    sky = rng.normal(0, SIGMA[:, None, None], (8, 5, 64, 64)).astype(np.float32)
    images = np.concatenate([galaxies, stars, sky])
    images[::7, 1, 20, 10:20] = 0.0  # masked runs
    images[3::11, 2, 30:34, 30:34] = images[3::11, 2].max() * 3  # flat tops
    ebv = np.resize(ebv, len(images))
    numpy_net, compiled_net = RecordingBlendNet(), RecordingBlendNet()
    expected = cutout_features(images, ebv, BANDS, PIXEL_SCALE_ARCSEC, numpy_net)
    got = features_jit.cutout_features(images, ebv, BANDS, PIXEL_SCALE_ARCSEC, compiled_net)
    assert set(got) == set(expected)
    for key in expected:
        a, b = np.asarray(expected[key], np.float64), np.asarray(got[key], np.float64)
        np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b), err_msg=key)
        np.testing.assert_allclose(b[np.isfinite(b)], a[np.isfinite(a)], rtol=1e-4, atol=1e-9, err_msg=key)
    assert got["identical_run"].sum() >= len(images) // 7 and (got["plateau"] > 6).sum() >= len(images) // 11
    np.testing.assert_allclose(compiled_net.x, blend_input(images, BANDS, PIXEL_SCALE_ARCSEC), rtol=1e-4, atol=1e-6)
    thresholds = reference["thresholds"]
    np.testing.assert_array_equal(flag_bits_from_features(got, thresholds),
                                  flag_bits_from_features(expected, thresholds))
