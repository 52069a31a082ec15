"""The injection report of photoz.training.evaluation.ood: each kind of out-of-range object made from in-range
cutouts and counted by the flags (synthetic disks as the "training set", as in test_quality)."""
import numpy as np
import pytest

from photoz.model.conventions import BANDS, PIXEL_SCALE_ARCSEC
from photoz.model.features import cutout_features
from photoz.model.quality import reference_thresholds
from tests.helpers import disk_galaxies

# one pytest-xdist worker runs this module (make test), so its module fixtures (thresholds, ...) are built once
pytestmark = pytest.mark.xdist_group("test_ood")


@pytest.fixture(scope="module")
def thresholds():
    images, ebv = disk_galaxies(np.random.default_rng(21), 2000)
    return reference_thresholds(cutout_features(images, ebv, BANDS, PIXEL_SCALE_ARCSEC))


def test_injected_objects_are_flagged_and_reported(thresholds):
    from photoz.training.evaluation.ood import INJECTIONS, format_report, measure

    images, ebv = disk_galaxies(np.random.default_rng(22), 120)
    report = measure(thresholds, images, ebv, seed=3)
    assert set(report["injected"]) == set(INJECTIONS)
    assert report["in_range"]["any_ood_flag"] <= 0.05
    for kind in ("ebv_above", "brighter", "fainter", "masked", "low_snr"):
        assert report["injected"][kind]["intended_flag"] >= 0.95, kind
    assert report["injected"]["star"]["intended_flag"] >= 0.8
    assert report["targets"]["injected_flagged_min"] == min(r["any_ood_flag"] for r in report["injected"].values())
    assert "in range" in format_report(report) and "star" in format_report(report)
    bins = report["injected"]["blend"]["by_separation_arcsec"]  # closer companions are harder to see
    assert [b["lo"] for b in bins] == [1.5, 2.0, 2.5] and sum(b["n"] for b in bins) == 120
    assert "separation_arcsec" in format_report(report)


def test_objects_without_a_positive_flux_are_not_scaled(thresholds):
    """A cutout whose r aperture flux is not positive has no magnitude to scale from: the brighter and fainter
    injections leave it out rather than make infinite pixels."""
    from photoz.training.evaluation.ood import measure

    images, ebv = disk_galaxies(np.random.default_rng(23), 30)
    images[0] = -np.abs(images[0]) - 1.0  # no positive flux anywhere
    with np.errstate(all="raise"):
        report = measure(thresholds, images, ebv, seed=4)
    assert report["injected"]["brighter"]["n"] == report["injected"]["fainter"]["n"] == 29
    assert report["injected"]["star"]["n"] == 30
