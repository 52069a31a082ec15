"""The model-magnitude benchmark measures what it says: an r-band profile fitted to every band changes a
galaxy's colours only when its bulge and disk differ in colour (the claim behind docs/simulation.md's
"SDSS-style model magnitudes" finding)."""
import numpy as np

from benchmarks.model_magnitudes import R, render_with_r_profile_templates
from photoz.model.conventions import BANDS

G = BANDS.index("g")


def _bulge_coloured_like_disk(pop: dict) -> None:
    offset = pop["mag_bulge"][:, R] - pop["mag_disk"][:, R]
    pop["mag_bulge"][:] = pop["mag_disk"] + offset[:, None]


def _bulge_redder_in_g(pop: dict) -> None:
    """Bulge and disk of equal r flux in every galaxy, the bulge a magnitude fainter in g."""
    pop["mag_bulge"][:] = pop["mag_disk"]
    pop["mag_bulge"][:, G] += 1.0
    pop["bulge_fraction"][:] = 0.5


def test_no_colour_gradient_means_identical_model_magnitudes():
    d = render_with_r_profile_templates(6, seed=7, edit=_bulge_coloured_like_disk, select=False)
    assert d["z"].size == 6
    np.testing.assert_allclose(d["sdss"], d["perfect"], atol=1e-4)


def test_colour_gradient_moves_the_single_profile_colours():
    d = render_with_r_profile_templates(6, seed=7, edit=_bulge_redder_in_g, select=False)
    g_minus_r_shift = (d["sdss"][:, G] - d["sdss"][:, R]) - (d["perfect"][:, G] - d["perfect"][:, R])
    r_shift = d["sdss"][:, R] - d["perfect"][:, R]
    assert np.abs(g_minus_r_shift).max() > 0.005  # the g band's own profile is not the r band's
    np.testing.assert_allclose(r_shift, 0, atol=1e-4)  # in r the two templates are the same profile
