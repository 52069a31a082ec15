"""The README's examples run as written: its curl command and its Python call against a live photoz serve."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import sky_cutouts

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_readme_curl_call_answers_as_the_readme_shows(server, tmp_path):
    [call] = [block for block in code_blocks("sh") if "curl" in block]
    np.save(tmp_path / "cutouts.npy", sky_cutouts(np.random.default_rng(2), 3))
    command = call.replace("http://127.0.0.1:8000", server.url).replace("\\\n", " ")
    done = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    shown = json.loads(code_blocks("json")[0])  # the README's answer, abridged but valid JSON
    assert set(shown) <= set(answer) and set(shown["ancil"]) <= set(answer["ancil"])
    assert set(shown["model"]) == set(answer["model"]) and set(shown["prior"]) <= set(answer["prior"])
    assert answer["n_objects"] == 3 and len(answer["data"]["pdfs"]) == 3 and answer["pdf_name"] == "hist"
    assert answer["ancil"]["z_mean"] and answer["prior"]["name"] == "train"


def test_the_readme_python_call_runs(server):
    [snippet] = code_blocks("python")
    rng = np.random.default_rng(3)
    namespace = {"images": sky_cutouts(rng, 4), "ebv": np.full(4, 0.02), "ids": ["a", "b", "c", "d"]}
    exec(compile(snippet.replace("http://127.0.0.1:8000", server.url), "README.md", "exec"), namespace)
    table = namespace["table"]
    assert list(table["id"]) == ["a", "b", "c", "d"] and "z_mean" in table.colnames and "pdf" in table.colnames


def test_the_readme_offline_commands_run(server, tmp_path):
    """`photoz predict` as the README writes it: a directory, a FITS cube and an .npy stack into Parquet with the
    shipped bundle, and an HDF5 data set through a running service into FITS."""
    import h5py
    import pyarrow.parquet as pq
    from astropy.io import fits

    [block] = [b for b in code_blocks("sh") if "photoz predict" in b]
    rng = np.random.default_rng(4)
    (tmp_path / "cutouts").mkdir()
    np.save(tmp_path / "cutouts" / "a.npy", sky_cutouts(rng, 2))
    fits.PrimaryHDU(sky_cutouts(rng, 1)[0]).writeto(tmp_path / "more.fits")
    np.save(tmp_path / "stack.npy", sky_cutouts(rng, 3))
    with h5py.File(tmp_path / "data.h5", "w") as h5:
        h5["images"] = sky_cutouts(rng, 4)
    for line in block.strip().splitlines():
        command = line.split("#")[0].replace("http://gpu-host:8000", server.url).split()
        assert command[0] == "photoz"
        done = subprocess.run([sys.executable, "-m", "photoz", *command[1:]], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    assert pq.read_table(tmp_path / "photoz.parquet").num_rows == 6
    with fits.open(tmp_path / "photoz.fits") as hdul:
        assert len(hdul["PHOTOZ"].data) == 4 and hdul[0].header["MODEL"] == "photoz-test-tiny"
