"""A non-editable install: site-packages gains `photoz` alone, and the commands run from there."""
import os
import subprocess
import sys
import sysconfig
import time
import venv
import zipfile
from pathlib import Path

import httpx
import numpy as np

from photoz.service.live import free_port

ROOT = Path(__file__).resolve().parents[2]


def _site_packages(env: Path) -> Path:
    return Path(sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)}))


def test_wheel_installs_one_photoz_package_that_predicts_and_serves(tmp_path, tiny_bundle):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("photoz-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        tops = {name.split("/")[0] for name in zf.namelist()}
    assert tops == {"photoz", wheel.name.split("-py3")[0] + ".dist-info"}, tops

    env = tmp_path / "env"
    venv.create(env, with_pip=False)
    site = _site_packages(env)
    # the dependencies come from the test environment (a plain path entry: its editable hook is not run)
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install", "--no-deps",
                    "-q", str(wheel)], check=True, capture_output=True)
    ours = sorted(p.name for p in site.iterdir() if p.name.lower().startswith(("photoz", "model", "service",
                                                                                "training", "formats", "pipeline")))
    assert ours == ["photoz", wheel.name.split("-py3")[0] + ".dist-info"], ours

    run = {"cwd": tmp_path, "capture_output": True, "text": True, "timeout": 120,
           "env": {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}}
    where = subprocess.run([env / "bin" / "python", "-c", "import photoz.model.bundle as b, photoz.service.app; "
                            "print(b.__file__); print(b.default_bundle_path().is_file())"], **run)
    assert where.returncode == 0, where.stderr
    module, bundle_found = where.stdout.split()
    assert Path(module).is_relative_to(site) and bundle_found == "True"
    # in a checkout's root, python finds the checkout's photoz first (the recipes' `python -m photoz.training...`):
    # its rooms are the folders beside it, not the installed package's
    in_checkout = subprocess.run([env / "bin" / "python", "-m", "photoz.training.evaluation.ood", "--help"],
                                 **{**run, "cwd": ROOT})
    assert in_checkout.returncode == 0 and "--model" in in_checkout.stdout, in_checkout.stderr

    np.save(tmp_path / "cutouts.npy", np.random.default_rng(0).normal(0, 0.05, (3, 5, 64, 64)).astype(np.float32))
    predicted = subprocess.run([env / "bin" / "photoz", "predict", "cutouts.npy", "--model", str(tiny_bundle),
                                "--out", "out.fits", "--quiet"], **run)
    assert predicted.returncode == 0 and "3 rows" in predicted.stdout, predicted.stderr
    assert subprocess.run([env / "bin" / "photoz", "cutouts", "--help"], **run).returncode == 0

    port = free_port()
    server = subprocess.Popen([env / "bin" / "photoz", "serve", "--port", str(port)], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    models = None
    try:  # the shipped bundle, found as package data
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and server.poll() is None:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                if models.status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert models is not None and models.status_code == 200
        assert models.json()["models"][0]["name"] == "photoz-sdss-sim"
    finally:
        server.terminate()
        server.wait(30)
