"""photoz completeness: a selection's C(z) measured on a real catalogue file (astropy-written FITS and CSV)."""
import json

import numpy as np
import pytest
from astropy.table import Table

from photoz.cli import main
from photoz.model.pdf import RedshiftBins
from photoz.model.priors import completeness_histogram, resolve_selection


@pytest.fixture
def catalogue(rng, tmp_path):
    """A reference catalogue: redshifts, an r magnitude that fades with z, a u - r colour; two rows unusable."""
    n = 3000
    z = rng.uniform(0.0, 0.35, n)
    r = 15.0 + 12.0 * z + rng.normal(0, 0.5, n)
    u = r + 1.5 + 4.0 * z + rng.normal(0, 0.4, n)
    r[5] = np.nan  # a missing magnitude: left out of both counts
    z[7] = np.nan
    table = Table({"Z": z, "petroMag_r": r, "u": u})
    table.write(tmp_path / "ref.fits")
    table.write(tmp_path / "ref.csv")
    return table, tmp_path


def test_completeness_is_the_kept_fraction_per_bin(catalogue, capsys):
    table, folder = catalogue
    out = folder / "selection.json"
    assert main(["completeness", str(folder / "ref.fits"), "--z-column", "Z", "--cut", "petroMag_r < 17",
                 "--cut", "u - petroMag_r >= 0.8", "--edges", "0:0.4:0.02", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    usable = np.isfinite(table["Z"]) & np.isfinite(table["petroMag_r"])
    z = np.asarray(table["Z"])[usable]
    kept = ((np.asarray(table["petroMag_r"]) < 17) & (np.asarray(table["u"] - table["petroMag_r"]) >= 0.8))[usable]
    edges = np.linspace(0, 0.4, 21)
    np.testing.assert_allclose(result["selection_edges"], edges, atol=1e-12)
    np.testing.assert_allclose(result["selection_completeness"], completeness_histogram(z, kept, edges), atol=1e-8)
    assert result["n_unusable"] == 2 and result["n_reference"] == 2998 and result["n_selected"] == kept.sum()
    assert result["cuts"] == ["petroMag_r < 17", "u - petroMag_r >= 0.8"]
    c = np.asarray(result["selection_completeness"])
    assert c[0] > 0.9 and c[-3] < 0.05  # bright nearby galaxies kept, faint distant ones not
    assert result["empty_bins"] == 2 and c[-1] == 0.5  # no reference object beyond z 0.35: unknown, 1/2
    # the printed flags are what predict and a request take
    flags = capsys.readouterr().out.split()
    assert flags[0] == "--selection-edges" and flags[2] == "--selection-completeness"
    per_bin = resolve_selection(flags[1].split(","), flags[3].split(","), RedshiftBins.uniform(0.0, 0.4, 180))
    assert per_bin[0] == pytest.approx(c[0], rel=1e-5)
    # the CSV of the same table gives the same numbers
    assert main(["completeness", str(folder / "ref.csv"), "--z-column", "Z", "--cut", "petroMag_r < 17",
                 "--cut", "u - petroMag_r >= 0.8", "--edges", "0:0.4:0.02", "--out", str(folder / "csv.json")]) == 0
    np.testing.assert_allclose(json.loads((folder / "csv.json").read_text())["selection_completeness"],
                               result["selection_completeness"], atol=1e-8)


@pytest.mark.parametrize("args, message", [
    (["--cut", "petroMag_r lt 17"], "expected COLUMN OP VALUE"),
    (["--cut", "petroMag_r < faint"], "expected COLUMN OP VALUE"),
    (["--cut", "petroMag_g < 17"], "no column 'petroMag_g'; columns are"),
    (["--cut", "petroMag_r < 17", "--z-column", "redshift"], "no column 'redshift'"),
    (["--cut", "petroMag_r < 17", "--edges", "0:0.4:-0.1"], "--edges '0:0.4:-0.1': expected START:STOP:STEP"),
    (["--cut", "petroMag_r < 17", "--edges", "0.5:0.9:0.1"], "no usable row has Z within 0.5-0.9"),
])
def test_a_bad_cut_or_column_is_one_line_naming_it(catalogue, capsys, args, message):
    _, folder = catalogue
    args = args if "--z-column" in args else [*args, "--z-column", "Z"]
    assert main(["completeness", str(folder / "ref.fits"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("photoz completeness: ") and message in err, err


def test_an_unreadable_catalogue_is_named(tmp_path, capsys):
    (tmp_path / "junk.fits").write_bytes(b"not a table")
    assert main(["completeness", str(tmp_path / "junk.fits"), "--cut", "r < 17"]) == 2
    assert "junk.fits: not a readable catalogue" in capsys.readouterr().err
