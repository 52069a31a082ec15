"""The docs' runnable examples run as written (beside tests/integration/test_readme.py for the README): the API
page's curl calls against a live server, and docs/pipeline.md's field-to-photo-z walk-through. The rest of the
docs' commands are parsed by tests/unit/test_doc_commands.py."""
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from tests.helpers import sky_cutouts

ROOT = Path(__file__).resolve().parents[2]


def shell_blocks(page: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", (ROOT / "docs" / page).read_text(), re.S)


def commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments dropped."""
    lines = block.replace("\\\n", " ").splitlines()
    return [line.split("  #")[0].split(" # ")[0].strip() for line in lines if line.strip() and
            not line.lstrip().startswith("#")]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_api_pages_curl_calls_answer_as_it_says(server, tmp_path):
    [block] = [b for b in shell_blocks("api.md") if "curl" in b]
    rng = np.random.default_rng(7)
    np.save(tmp_path / "cutouts.npy", sky_cutouts(rng, 3))
    np.savez(tmp_path / "cutouts.npz", images=sky_cutouts(rng, 2), ebv=np.array([0.01, 0.02]), ids=["x", "y"])
    fits.PrimaryHDU(sky_cutouts(rng, 1)[0]).writeto(tmp_path / "galaxy.fits")
    fits.PrimaryHDU(sky_cutouts(rng, 2)).writeto(tmp_path / "a.fits")
    np.save(tmp_path / "b.npy", sky_cutouts(rng, 1))
    answers = []
    for command in commands(block):
        argv = shlex.split(command.replace("http://127.0.0.1:8000", server.url))
        done = subprocess.run(argv + ["--fail-with-body", "-sS"], cwd=tmp_path, capture_output=True, timeout=60)
        assert done.returncode == 0, (command, done.stdout[:500], done.stderr)
        answers.append(done.stdout)
    npy, npz, galaxy, estimates_only = (json.loads(a) for i, a in enumerate(answers) if i != 3)
    assert npy["n_objects"] == 3 and len(npy["data"]["pdfs"]) == 3
    assert npz["ancil"]["ids"] == ["x", "y"]
    assert galaxy["n_objects"] == 1
    assert "pdfs" not in estimates_only.get("data", {}) and len(estimates_only["ancil"]["z_mean"]) == 3
    table = Table.read(tmp_path / "photoz.fits")  # -o photoz.fits: the FITS table of the three cutouts
    assert len(table) == 3 and "Z_MEAN" in {c.upper() for c in table.colnames}


@pytest.mark.slow
def test_the_field_walk_through_of_the_pipeline_page_runs(tmp_path):
    """docs/pipeline.md: a simulated field, its cutouts and their photo-z table; 36 rows, the two objects too
    near the edge without a PDF, as the page says."""
    [block] = [b for b in shell_blocks("pipeline.md") if "36 rows" in b]
    photoz = [sys.executable, "-c", "import sys; from photoz.cli import main; sys.exit(main(sys.argv[1:]))"]
    for command in commands(block):
        argv = shlex.split(command)
        assert argv[0] == "photoz", command
        done = subprocess.run(photoz + argv[1:], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (command, done.stderr[-2000:])
    table = Table.read(tmp_path / "field" / "photoz.fits")
    valid = np.asarray(table["VALID"] if "VALID" in table.colnames else table["valid"], bool)
    assert len(table) == 36 and (~valid).sum() == 2
