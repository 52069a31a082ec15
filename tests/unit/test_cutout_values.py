"""Pixel values and E(B-V) the network cannot use are each object's own problem (photoz.formats.cutouts)."""
import numpy as np
import pytest

from photoz.formats.cutouts import Cutouts, Geometry, finish, flag_unusable_pixels
from photoz.formats.errors import InputError
from photoz.model.conventions import BANDS, MAX_ABS_PIXEL_NMGY, mag_to_nanomaggies

GEOMETRY = Geometry(BANDS, 64)


def test_the_bound_lies_above_any_star_and_below_mask_sentinels():
    sirius_nmgy = mag_to_nanomaggies(-1.46)  # the brightest star in the night sky, all its light
    assert sirius_nmgy < MAX_ABS_PIXEL_NMGY < 1e30


@pytest.mark.parametrize(("value", "band", "words"), [
    (1e30, 2, "beyond any physical flux"), (-1e30, 0, "beyond any physical flux"),
    (3.4e38, 4, "beyond any physical flux"), (np.nan, 1, "non-finite"), (-np.inf, 3, "non-finite"),
    (1.0000001e10, 2, "beyond any physical flux")])
def test_an_unusable_pixel_is_named_with_its_band_and_value(value, band, words):
    images = np.random.default_rng(0).normal(0, 0.05, (3, 5, 64, 64)).astype(np.float32)
    images[1, band, 7, 9] = value
    problems = flag_unusable_pixels(images, BANDS)
    assert problems[0] is None and problems[2] is None
    assert words in problems[1] and f"band {BANDS[band]}" in problems[1]
    if words != "non-finite":
        assert f"{np.float32(value):.3g}" in problems[1] and "nanomaggies" in problems[1]


@pytest.mark.parametrize("fill", [0.0, 1e-40, -1e-40, MAX_ABS_PIXEL_NMGY, -MAX_ABS_PIXEL_NMGY])
def test_extreme_but_physical_or_empty_cutouts_are_accepted(fill):
    """All-zero, subnormal and brightest-possible cutouts go to the model (the flags judge them)."""
    assert flag_unusable_pixels(np.full((2, 5, 64, 64), fill, np.float32), BANDS) == [None, None]


def test_several_bands_and_kinds_in_one_cutout_are_all_named():
    images = np.zeros((1, 5, 64, 64), np.float32)
    images[0, 0, 0, 0], images[0, 3, 5, 5], images[0, 4, 1, 1] = np.nan, 1e30, -2e20
    problem = flag_unusable_pixels(images, BANDS)[0]
    assert "non-finite pixel values (NaN or inf) in band u" in problem
    assert "i (1e+30 nanomaggies)" in problem and "z (-2e+20 nanomaggies)" in problem


def test_ebv_out_of_range_is_the_objects_problem_wherever_it_comes_from():
    images = np.zeros((3, 5, 64, 64), np.float32)
    from_file = finish(images, GEOMETRY, [0.1, 11.0, np.nan], None, "images")
    assert from_file.problems[0] is None and "E(B-V) 11.0" in from_file.problems[1]
    assert "E(B-V) nan" in from_file.problems[2] and from_file.ebv.tolist() == pytest.approx([0.1, 0, 0])
    given = Cutouts(images, np.zeros(3, np.float32), ["a", "b", "c"], [None, "bad pixels", None])
    given.set_ebv(["0.02", "-1", "0.03"])
    assert given.problems == [None, "bad pixels; E(B-V) -1.0 is not a finite value in 0-10 mag", None]
    with pytest.raises(InputError, match="one E\\(B-V\\) in mag per cutout"):
        given.set_ebv([0.1, 0.2])
