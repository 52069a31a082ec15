"""``photoz sdss-dataset`` end to end against a local fake of SkyServer and the SAS (tests/fake_sdss.py): paging,
retries on 5xx, range resume of a frame, neighbour fields for edge objects, a kill and a resume, and the written
file's redshifts, E(B-V) and r-band fluxes against what the fake served; then `photoz train` and `photoz evaluate
--split test` on it."""
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from photoz.model.conventions import BANDS, EXTINCTION_A_OVER_EBV
from tests.fake_sdss import CAMCOL, FIELDS, RUN, FakeArchive, build_archive

# one pytest-xdist worker runs this module (make test), so its module fixtures (archive, ...) are built once
pytestmark = pytest.mark.xdist_group("test_sdss_dataset")

pytest.importorskip("reproject")
FRAME_U_11 = f"/sas/301/{RUN}/{CAMCOL}/frame-u-{RUN:06d}-{CAMCOL}-{FIELDS[0]:04d}.fits.bz2"


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdss")
    built = build_archive(root)
    fake = FakeArchive(root, built["rows"])
    yield fake, built
    fake.close()


def command(fake, out, *extra):
    return [sys.executable, "-m", "photoz", "sdss-dataset", "--out", str(out), "--skyserver", fake.url + "/skyserver",
            "--sas", fake.url + "/sas", "--region", "0,360,-90,90", "--page-size", "5", "--chunk-size", "3",
            "--backoff", "0.05", "--nside", "8192", "--splits", "0.6,0.2,0.2", "--seed", "1", *extra]


def read(path):
    with h5py.File(path, "r") as h5:
        return {"images": h5["images"][:], "z": h5["z"][:], "ebv": h5["ebv"][:], "split": h5["split"][:],
                **{f"catalogue/{k}": v[:] for k, v in h5["catalogue"].items()},
                "skipped/specobjid": h5["skipped/specobjid"][:],
                "skipped/reason": [r.decode() for r in h5["skipped/reason"][:]], "attrs": dict(h5.attrs)}


@pytest.fixture(scope="module")
def built_file(archive, tmp_path_factory):
    fake, _ = archive
    out = tmp_path_factory.mktemp("out") / "mgs.h5"
    fake.fail_next["/skyserver"] = 1  # the first selection page: 503 once
    fake.fail_next[FRAME_U_11] = 2  # a frame: 503 twice
    before = len(fake.requests)
    result = subprocess.run(command(fake, out), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, fake.requests[before:], result.stdout


def test_the_file_holds_what_the_archive_served(archive, built_file):
    fake, built = archive
    out, requests, stdout = built_file
    data = read(out)
    served = {r["specObjID"]: r for r in built["rows"]}
    # every galaxy but those that run off every frame, and the one whose field the archive lacks
    edge_ids = {built["rows"][k]["specObjID"] for k in built["edge_objects"]}
    expected = set(served) - edge_ids - {built["missing_field_specobjid"]}
    ids = data["catalogue/specobjid"].tolist()
    assert len(ids) == len(set(ids)) and set(ids) == expected, stdout
    reasons = dict(zip(data["skipped/specobjid"].tolist(), data["skipped/reason"], strict=True))
    assert set(reasons) == edge_ids | {built["missing_field_specobjid"]}
    assert "no frames" in reasons[built["missing_field_specobjid"]]
    assert all("runs off" in reasons[i] for i in edge_ids)
    # redshifts and E(B-V) as served; the fixed order
    np.testing.assert_array_equal(data["z"], [served[i]["z"] for i in ids])
    np.testing.assert_allclose(data["ebv"], [served[i]["extinction_r"] / EXTINCTION_A_OVER_EBV["r"] for i in ids],
                               rtol=1e-5)
    order = list(zip(data["catalogue/field"], data["catalogue/specobjid"], strict=True))
    assert order == sorted(order)
    # the r band of each cutout is the galaxy drawn alone (noise-free), the others the same galaxy resampled
    truth = built["truth"]
    k_of = {10_000 + 37 * k: k for k in range(len(truth["z"]))}
    r = BANDS.index("r")
    for row, specobjid in enumerate(ids):
        own = truth["images"][k_of[specobjid]]
        np.testing.assert_allclose(data["images"][row, r], own[r], atol=1e-4 * own[r].max())
        for b in range(len(BANDS)):  # every band: the same total flux within resampling
            assert abs(data["images"][row, b].sum() / own[b].sum() - 1) < 0.03, (specobjid, BANDS[b])
    # the galaxy whose stamp runs off its own frame came from the neighbouring field
    neighbour = ids.index(built["rows"][built["neighbour_object"]]["specObjID"])
    assert data["catalogue/field"][neighbour] == FIELDS[0] and data["catalogue/source_field"][neighbour] == FIELDS[1]
    # paging, retries, provenance, splits, the work folder gone
    assert requests.count("/skyserver") == 1 + 4  # 17 rows in pages of 5 (5, 5, 5, 2), one 503 retried
    assert requests.count(FRAME_U_11) == 3
    assert data["attrs"]["data_release"] == "DR17" and "legacy_target1" in data["attrs"]["query"]
    assert set(np.unique(data["split"])) == {0, 1, 2}
    assert not out.with_name(out.name + ".parts").exists()


def test_a_killed_run_resumes_without_duplicates(archive, built_file, tmp_path):
    fake, built = archive
    out = tmp_path / "mgs.h5"
    fake.slow[f"-{FIELDS[1]:04d}.fits"] = 60  # the second field's frames hang: the run is killed while waiting
    proc = subprocess.Popen(command(fake, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    parts = out.with_name(out.name + ".parts")
    try:
        deadline = time.monotonic() + 120
        while not (parts / "chunk-00000.npz").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert (parts / "chunk-00000.npz").exists(), proc.stdout.read() if proc.poll() is not None else "timeout"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        fake.slow.clear()
    assert not out.exists() and list(parts.glob("query-*.csv"))
    chunk0 = (parts / "chunk-00000.npz").stat().st_mtime_ns
    before = len(fake.requests)
    result = subprocess.run(command(fake, out), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "/skyserver" not in fake.requests[before:]  # the selection was kept, not asked again
    resumed, whole = read(out), read(built_file[0])
    for key in ("catalogue/specobjid", "z", "ebv", "split", "images"):
        np.testing.assert_array_equal(resumed[key], whole[key], err_msg=key)
    assert not parts.exists() and chunk0  # chunk 0 was reused (its file existed when the second run began)


def test_partial_frame_download_resumes_with_a_range_request(archive, tmp_path):
    from photoz.pipeline.sdss_archive import Fetcher, FrameCache

    fake, _ = archive
    cache = FrameCache(tmp_path, fake.url + "/sas", Fetcher(retries=1, backoff_s=0.01))
    full = (fake.root / FRAME_U_11.lstrip("/")).read_bytes()
    target = cache.path("u", RUN, CAMCOL, FIELDS[0])
    target.parent.mkdir(parents=True)
    target.with_name(target.name + ".part").write_bytes(full[:1000])
    assert cache.fetch("u", RUN, CAMCOL, FIELDS[0]).read_bytes() == full
    assert cache.downloaded_bytes == len(full) - 1000  # only the rest was sent
    assert cache.fetch("u", RUN, CAMCOL, 77) is None  # the archive has no such frame


def test_train_and_evaluate_use_the_sky_split(built_file, tmp_path, tiny_bundle):
    out = built_file[0]
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "photoz", "train", "--data", str(out), "--out", str(run),
                             "--variant", "pasquet2019_tiny", "--epochs", "1", "--batch-size", "4", "--workers", "0",
                             "--device", "cpu", "--quiet"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    import torch

    split = read(out)["split"]
    meta = torch.load(run / "last.pt", weights_only=False)["dataset"]
    assert meta["n_train"] == int((split == 0).sum()) and meta["n_validation"] == int((split == 1).sum())
    assert meta["split"] == "the file's split dataset"
    from photoz.training.evaluation.evaluate import evaluate

    report = evaluate(tiny_bundle, out, tmp_path / "eval", baseline_train=out, figures=False, split="test")
    assert report["n"] == int((split == 2).sum()) and report["split"] == "test"
    names = [b["name"] for b in report["strong_baselines"]]  # the catalogue's model magnitudes, dereddened
    assert names == ["KNN (k=16) on dereddened model r + 4 colours", "LocalLinear (k=100) on dereddened model r + "
                     "4 colours"]
