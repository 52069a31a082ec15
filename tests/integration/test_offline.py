"""photoz predict: offline over files, resumable, same numbers as the engine and the service."""
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

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
    summary = predict_files([d], tmp_path / "out.fits", model=tiny_bundle, chunk_size=4, progress=False)
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
    predict_files([d], tmp_path / "o.parquet", model=tiny_bundle, progress=False)
    table = pq.read_table(tmp_path / "o.parquet")
    assert table.num_rows == 10 and "pdf" in table.column_names
    assert b"photoz" in table.schema.metadata
    predict_files([d], tmp_path / "o.hdf5", model=tiny_bundle, chunk_size=3, progress=False)
    ens = qp.read(str(tmp_path / "o.hdf5"))
    assert ens.npdf == 9  # the invalid cutout is listed in the file's attributes, not in the ensemble
    with h5py.File(tmp_path / "o.hdf5") as h5:
        assert json.loads(h5.attrs["rejected_ids"]) == ["c2"]
        assert "band u" in json.loads(h5.attrs["rejected_errors"])[0]


def test_hdf5_dataset_input_and_resume_skips_finished_chunks(tiny_bundle, tmp_path, rng, monkeypatch):
    data = tmp_path / "set.h5"
    images = sky_cutouts(rng, 12)
    with h5py.File(data, "w") as h5:
        h5["images"], h5["ebv"] = images, np.full(12, 0.02, np.float32)
    from photoz.pipeline.engines import LocalEngine

    calls = []
    original = LocalEngine.run

    def failing_run(self, im, e):
        calls.append(len(im))
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, im, e)

    monkeypatch.setattr(LocalEngine, "run", failing_run)
    with pytest.raises(KeyboardInterrupt):
        predict_files([data], tmp_path / "r.fits", model=tiny_bundle, chunk_size=4, progress=False)
    assert len(list((tmp_path / "r.fits.parts").glob("chunk-*.npz"))) == 2
    calls.clear()
    predict_files([data], tmp_path / "r.fits", model=tiny_bundle, chunk_size=4, progress=False)
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
        predict_files([tmp_path / "nope"], tmp_path / "o.fits", model=tiny_bundle, progress=False)
    with pytest.raises(ValueError, match=r"\.fits, \.parquet or \.hdf5"):
        predict_files([tmp_path], tmp_path / "o.csv", model=tiny_bundle, progress=False)


@pytest.mark.slow
def test_dask_local_cluster_of_two_workers_gives_the_single_process_table(inputs, tiny_bundle, tmp_path):
    d, _, _ = inputs
    predict_files([d], tmp_path / "single.fits", model=tiny_bundle, chunk_size=3, progress=False)
    predict_files([d], tmp_path / "dask.fits", model=tiny_bundle, chunk_size=3, progress=False, dask="local:2",
                  keep_parts=True)
    a, b = Table.read(tmp_path / "single.fits", hdu="PHOTOZ"), Table.read(tmp_path / "dask.fits", hdu="PHOTOZ")
    assert a.colnames == b.colnames and len(a) == len(b) == 10
    for name in a.colnames:
        if a[name].dtype.kind == "f":
            np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))
        else:
            assert list(a[name]) == list(b[name])
    manifest = json.loads((tmp_path / "dask.fits.parts" / "manifest.json").read_text())
    assert len(manifest["parts"]) == 4 and manifest["signature"]["chunk_size"] == 3
