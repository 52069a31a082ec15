"""The SDSS selection query, SkyServer's CSV and its error pages, regions, sky splits."""
import numpy as np
import pytest

from photoz.pipeline.sdss import sky_splits
from photoz.pipeline.sdss_archive import (
    CATALOGUE_COLUMNS,
    MGS_PETRO_R_LIMIT_MAG,
    Region,
    SDSSArchiveError,
    parse_skyserver_csv,
    selection_sql,
)


def test_selection_is_the_main_galaxy_sample_paged_by_specobjid():
    sql = selection_sql(500, 12345, Region(10, 20, -1, 1))
    for clause in ("SELECT TOP 500", "s.class = 'GALAXY'", "s.zWarning = 0", "s.sciencePrimary = 1",
                   "(s.legacy_target1 & 64) != 0", f"p.petroMag_r - p.extinction_r <= {MGS_PETRO_R_LIMIT_MAG}",
                   "s.z < 0.4", "s.specObjID > 12345", "p.ra BETWEEN 10 AND 20 AND p.dec BETWEEN -1 AND 1",
                   "ORDER BY s.specObjID", "s.specObjID, p.objID", "p.extinction_r"):
        assert clause in sql, clause
    assert "BETWEEN" not in selection_sql(10)


def test_skyserver_csv_and_its_error_pages():
    header = ",".join(CATALOGUE_COLUMNS)
    row = ",".join(str(i) for i in range(len(CATALOGUE_COLUMNS)))
    rows = parse_skyserver_csv(f"#Table1\n{header}\n{row}\n", "u")
    assert rows[0]["specObjID"] == "0" and rows[0]["petroR50_r"] == str(len(CATALOGUE_COLUMNS) - 1)
    assert parse_skyserver_csv(f"#Table1\n{header}\n", "u") == []  # an empty page: the selection is exhausted
    with pytest.raises(SDSSArchiveError, match="expected a CSV table"):
        parse_skyserver_csv("<html>SQL error: Invalid column name 'z'</html>", "https://skyserver/x")


@pytest.mark.parametrize("text", ["1,2,3", "20,10,0,1", "0,10,5,-5", "a,b,c,d", "0,10,-95,0"])
def test_bad_regions_are_refused_with_the_expected_form(text):
    with pytest.raises(ValueError, match="RA_MIN,RA_MAX,DEC_MIN,DEC_MAX"):
        Region.parse(text)


def test_sky_splits_keep_each_healpix_pixel_whole():
    rng = np.random.default_rng(0)
    ra, dec = rng.uniform(0, 60, 20000), rng.uniform(-10, 10, 20000)
    split = sky_splits(ra, dec, (0.8, 0.1, 0.1), nside=16, seed=3)
    fractions = np.bincount(split, minlength=3) / split.size
    assert abs(fractions[0] - 0.8) < 0.15 and fractions[1] > 0 and fractions[2] > 0
    import astropy.units as u
    from astropy_healpix import HEALPix

    pixels = HEALPix(16, order="nested").lonlat_to_healpix(ra * u.deg, dec * u.deg)
    for pixel in np.unique(pixels):
        assert np.unique(split[pixels == pixel]).size == 1
    np.testing.assert_array_equal(split, sky_splits(ra, dec, (0.8, 0.1, 0.1), nside=16, seed=3))  # deterministic


def test_sky_splits_draw_only_the_pixels_objects_occupy():
    """The same split as drawing a number for every pixel of the sky (what the builder did, and what files made
    with it hold), without the whole sky's draws: at nside 8192 those were 805 million numbers (6.4 GB)."""
    import tracemalloc

    import astropy.units as u
    from astropy_healpix import HEALPix

    from photoz.pipeline.sdss import pixel_draws

    rng = np.random.default_rng(7)
    ra, dec = rng.uniform(0, 360, 3000), np.degrees(np.arcsin(rng.uniform(-1, 1, 3000)))
    for nside, seed in ((16, 3), (64, 1)):
        pixels = HEALPix(nside=nside, order="nested").lonlat_to_healpix(ra * u.deg, dec * u.deg)
        whole_sky = np.random.default_rng(seed).random(12 * nside ** 2)[pixels]
        np.testing.assert_array_equal(pixel_draws(np.asarray(pixels, np.int64), seed), whole_sky)
    tracemalloc.start()
    split = sky_splits(ra, dec, (0.6, 0.2, 0.2), nside=8192, seed=1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50 * 2**20 and set(np.unique(split)) == {0, 1, 2}
