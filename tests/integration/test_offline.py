"""photoz predict: offline over files, resumable, same numbers as the engine and the service."""
import io
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from photoz.pipeline.jobs import PredictJob
from photoz.pipeline.predict import chunk_plan, predict_files
from tests.helpers import sky_cutouts


@pytest.fixture
def inputs(tmp_path, rng):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    a, b, c = sky_cutouts(rng, 5), sky_cutouts(rng, 1)[0], sky_cutouts(rng, 4)
    c[2, 0, 0, 0] = np.nan
    np.save(d / "a.npy", a)
    fits.PrimaryHDU(b).writeto(d / "sub" / "b.fits")
    np.savez(d / "c.npz", images=np.moveaxis(c, 1, -1), ebv=np.full(4, 0.05, np.float32),
             ids=np.array(["c0", "c1", "c2", "c3"]))
    return d, np.concatenate([a, b[None], c]), np.concatenate([np.zeros(6), np.full(4, 0.05)]).astype(np.float32)


def test_directory_to_fits_table_matches_the_engine(inputs, tiny_bundle, tiny_predictor, tmp_path):
    d, images, ebv = inputs
    summary = predict_files(PredictJob([d], tmp_path / "out.fits", model=tiny_bundle, chunk_size=4, quiet=True))
    assert summary["objects"] == 10
    with fits.open(tmp_path / "out.fits") as hdul:
        t = hdul["PHOTOZ"].data
        ids = list(t["ID"])
        assert ids[:5] == [f"a.npy:{i}" for i in range(5)]
        assert list(t["VALID"]).count(False) == 1 and "band u" in t["ERROR"][ids.index("c2")]
        valid = np.array(t["VALID"])
        # file order is sorted: a.npy, c.npz, sub/b.fits
        order = [0, 1, 2, 3, 4, 6, 7, 8, 9, 5]
        want = tiny_predictor.predict(images[order], ebv[order])
        np.testing.assert_allclose(np.array(t["PDF"])[valid], want[valid], atol=1e-6)
        assert np.isnan(t["Z_MEAN"][~valid]).all()
        assert len(hdul["BINS"].data["Z_EDGES"]) == 181
    assert not (tmp_path / "out.fits.parts").exists()


def test_parquet_and_qp_hdf5_outputs(inputs, tiny_bundle, tmp_path):
    import pyarrow.parquet as pq
    import qp

    d, _, _ = inputs
    predict_files(PredictJob([d], tmp_path / "o.parquet", model=tiny_bundle, quiet=True))
    table = pq.read_table(tmp_path / "o.parquet")
    assert table.num_rows == 10 and "pdf" in table.column_names
    assert b"photoz" in table.schema.metadata
    predict_files(PredictJob([d], tmp_path / "o.hdf5", model=tiny_bundle, chunk_size=3, quiet=True))
    ens = qp.read(str(tmp_path / "o.hdf5"))
    assert ens.npdf == 9  # the invalid cutout is listed in the file's attributes, not in the ensemble
    with h5py.File(tmp_path / "o.hdf5") as h5:
        assert json.loads(h5.attrs["rejected_ids"]) == ["c2"]
        assert "band u" in json.loads(h5.attrs["rejected_errors"])[0]


def interrupt_engine(monkeypatch, at_call: int) -> list[int]:
    """Make the local engine raise KeyboardInterrupt on its ``at_call``-th call; returns the batch sizes seen."""
    from photoz.pipeline.engines import LocalEngine

    calls: list[int] = []
    original = LocalEngine.run

    def run(self, images, ebv):
        calls.append(len(images))
        if len(calls) == at_call:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, images, ebv)

    monkeypatch.setattr(LocalEngine, "run", run)
    return calls


def test_hdf5_dataset_input_and_resume_skips_finished_chunks(tiny_bundle, tmp_path, rng, monkeypatch):
    data = tmp_path / "set.h5"
    images = sky_cutouts(rng, 12)
    with h5py.File(data, "w") as h5:
        h5["images"], h5["ebv"] = images, np.full(12, 0.02, np.float32)
    calls = interrupt_engine(monkeypatch, at_call=3)
    with pytest.raises(KeyboardInterrupt):
        predict_files(PredictJob([data], tmp_path / "r.fits", model=tiny_bundle, chunk_size=4, quiet=True))
    assert len(list((tmp_path / "r.fits.parts").glob("chunk-*.npz"))) == 2
    calls.clear()
    predict_files(PredictJob([data], tmp_path / "r.fits", model=tiny_bundle, chunk_size=4, quiet=True))
    assert calls == [4]  # only the unfinished chunk ran
    t = Table.read(tmp_path / "r.fits", hdu="PHOTOZ")
    assert len(t) == 12 and list(t["ID"][:2]) == ["set.h5:0", "set.h5:1"]


def test_chunk_plan_spans_files():
    class S:
        def __init__(self, n):
            self.n = n

    plan = chunk_plan([S(3), S(5), S(1)], 4)
    assert [[(a, b) for _, a, b in chunk] for chunk in plan] == [[(0, 3), (0, 1)], [(1, 5)], [(0, 1)]]


def test_cli_against_a_running_service(inputs, server, tiny_predictor, tmp_path):
    d, images, ebv = inputs
    out = tmp_path / "remote.fits"
    result = subprocess.run([sys.executable, "-m", "photoz", "predict", str(d), "--url", server.url, "--out",
                             str(out), "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    t = Table.read(out, hdu="PHOTOZ")
    order = [0, 1, 2, 3, 4, 6, 7, 8, 9, 5]
    want = tiny_predictor.predict(images[order], ebv[order])
    valid = np.array(t["VALID"])
    np.testing.assert_allclose(np.array(t["PDF"])[valid], want[valid], atol=1e-6)


def test_missing_input_is_a_clear_error(tmp_path, tiny_bundle):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        predict_files(PredictJob([tmp_path / "nope"], tmp_path / "o.fits", model=tiny_bundle, quiet=True))
    with pytest.raises(ValueError, match=r"\.fits, \.parquet or \.hdf5"):
        predict_files(PredictJob([tmp_path], tmp_path / "o.csv", model=tiny_bundle, quiet=True))


@pytest.mark.slow
def test_dask_local_cluster_of_two_workers_gives_the_single_process_table(inputs, tiny_bundle, tmp_path):
    d, _, _ = inputs
    predict_files(PredictJob([d], tmp_path / "single.fits", model=tiny_bundle, chunk_size=3, quiet=True))
    predict_files(PredictJob([d], tmp_path / "dask.fits", model=tiny_bundle, chunk_size=3, quiet=True,
                             dask="local:2", keep_parts=True))
    a, b = Table.read(tmp_path / "single.fits", hdu="PHOTOZ"), Table.read(tmp_path / "dask.fits", hdu="PHOTOZ")
    assert a.colnames == b.colnames and len(a) == len(b) == 10
    for name in a.colnames:
        if a[name].dtype.kind == "f":
            np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))
        else:
            assert list(a[name]) == list(b[name])
    manifest = json.loads((tmp_path / "dask.fits.parts" / "manifest.json").read_text())
    assert len(manifest["parts"]) == 4 and manifest["signature"]["chunk_size"] == 3


def test_a_changed_input_is_not_resumed_into_old_rows(tiny_bundle, tmp_path, rng, monkeypatch):
    """Resume keys on each input's size and modification time, not only its path and count."""
    data = tmp_path / "in.npy"
    np.save(data, sky_cutouts(rng, 6))
    interrupt_engine(monkeypatch, at_call=2)
    with pytest.raises(KeyboardInterrupt):
        predict_files(PredictJob([data], tmp_path / "o.fits", model=tiny_bundle, chunk_size=3, quiet=True))
    np.save(data, sky_cutouts(rng, 6))  # regenerated: same path, same count, other pixels
    os.utime(data, ns=(1, 1))  # and an mtime that differs whatever the clock's resolution
    with pytest.raises(RuntimeError, match="changed files"):
        predict_files(PredictJob([data], tmp_path / "o.fits", model=tiny_bundle, chunk_size=3, quiet=True))


def test_gzipped_fits_in_a_directory_and_utf8_ids_everywhere(tiny_bundle, tiny_predictor, tmp_path, rng):
    import gzip

    import pyarrow.parquet as pq

    d = tmp_path / "in"
    d.mkdir()
    images = sky_cutouts(rng, 2)
    buffer = io.BytesIO()
    ids = fits.BinTableHDU.from_columns([fits.Column("ID", "20A", array=["étoile-α".encode(), "星系".encode()])])
    fits.HDUList([fits.PrimaryHDU(images), ids]).writeto(buffer)
    (d / "pair.fits.gz").write_bytes(gzip.compress(buffer.getvalue()))
    (d / "notes.txt").write_text("not an input")
    for suffix in (".fits", ".parquet", ".hdf5"):
        summary = predict_files(PredictJob([d], tmp_path / f"o{suffix}", model=tiny_bundle, quiet=True))
        assert summary["objects"] == 2
    table = Table.read(tmp_path / "o.fits", hdu="PHOTOZ")
    assert list(table["ID"]) == ["étoile-α", "星系"]
    np.testing.assert_allclose(np.asarray(table["PDF"]), tiny_predictor.predict(images, np.zeros(2)), atol=1e-6)
    assert pq.read_table(tmp_path / "o.parquet").column("id").to_pylist() == ["étoile-α", "星系"]
    with h5py.File(tmp_path / "o.hdf5") as h5:
        assert [v.decode() for v in h5["ancil/ids"][...]] == ["étoile-α", "星系"]


def test_a_bad_ebv_fails_its_object_not_the_run(tiny_bundle, tmp_path, rng):
    np.savez(tmp_path / "c.npz", images=sky_cutouts(rng, 3), ebv=np.array([0.02, np.nan, 0.03], np.float32))
    predict_files(PredictJob([tmp_path / "c.npz"], tmp_path / "o.fits", model=tiny_bundle, quiet=True))
    table = Table.read(tmp_path / "o.fits", hdu="PHOTOZ")
    assert list(table["VALID"]) == [True, False, True]
    assert "E(B-V) nan" in table["ERROR"][1] and np.isfinite(table["Z_MEAN"][[0, 2]]).all()


def test_cli_errors_name_the_file_and_the_argument_without_a_traceback(tiny_bundle, tmp_path, rng):
    good, bad = tmp_path / "in" / "good.npy", tmp_path / "in" / "broken.npz"
    good.parent.mkdir()
    np.save(good, sky_cutouts(rng, 2))
    bad.write_bytes(b"PK\x03\x04 this is no zip archive")
    cli = [sys.executable, "-m", "photoz", "predict", str(tmp_path / "in"), "--model", str(tiny_bundle), "--quiet"]
    result = subprocess.run([*cli, "--out", str(tmp_path / "o.fits")], capture_output=True, text=True)
    assert result.returncode == 2 and "broken.npz" in result.stderr and "Traceback" not in result.stderr
    for flag in ("--chunk-size", "--batch-size"):
        result = subprocess.run([*cli, "--out", str(tmp_path / "o.fits"), flag, "0"], capture_output=True, text=True)
        assert result.returncode == 2 and "must be at least 1" in result.stderr
    with pytest.raises(ValueError, match="at least 1"):
        predict_files(PredictJob([good], tmp_path / "o.fits", model=tiny_bundle, chunk_size=0, quiet=True))
