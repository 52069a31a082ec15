"""Build the Docker images without a Docker engine and smoke-test them (``make docker-test``).

Recipe (Debian): a base image from ``debootstrap --variant=minbase`` with
Debian's python3 and python3-venv, imported with podman; the Dockerfile built
by ``buildah bud --isolation chroot`` with ``BASE_IMAGE`` pointing at it and
the host's CA bundle mounted for pip; containers run with ``buildah from`` +
``buildah run --isolation chroot`` on the host network (``podman run`` cannot
``setrlimit`` here).

CPU image: start ``photoz serve`` exactly as the image's CMD does, wait for
/readyz, POST a FITS cutout, check the PDF and /metrics, send SIGTERM and
check it drained and exited 0; check it runs as non-root and holds no
torch. GPU image (``--gpu``): CUDAExecutionProvider among ONNX Runtime's
providers, and the service falling back to the CPU, saying so, when there is
no GPU. Image sizes are printed and written to benchmarks/results/.

The GPU image builds in the background while the CPU image is built and
smoke-tested, when the disk has room for both builds at once.

Disk: building the 3 GB GPU image holds about 13 GB at its peak (measured:
the build stage's container, the runtime stage's, and the commit's blob and
layer), the CPU image's build beside it about 3 GB more. Images this script
left behind on earlier runs are removed first; when the container storage
still has less than ``--gpu-min-free-gb`` free, the GPU image is not built
(said so, and in the JSON) and its dependency set is resolved instead, with
pip inside the CPU image: the GPU variant's wheels must exist for the image's
Python, without the gigabytes.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASE = "localhost/photoz-base:bookworm"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
TAGS = ("localhost/photoz:cpu", "localhost/photoz:gpu")
#: the GPU variant's extra requirement, as the Dockerfile installs it
GPU_REQUIREMENT = "onnxruntime-gpu[cuda,cudnn]>=1.20"
#: disk the GPU image's build holds at its peak (13.2 GB measured, 2026-11-26), with a margin
GPU_BUILD_PEAK_GB = 16.0
#: the CPU image's build beside it (an 0.8 GB image: its containers, blob and layer), GB
CPU_BUILD_PEAK_GB = 3.0


def sh(*cmd, check=True, capture=True, **kw) -> str:
    result = subprocess.run(cmd, check=False, text=True, capture_output=capture, **kw)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout if capture else ""


def ensure_tools() -> None:
    missing = [t for t in ("buildah", "podman", "debootstrap") if not shutil.which(t)]
    if missing:
        print(f"installing {', '.join(missing)} ...", flush=True)
        try:
            sh("apt-get", "install", "-y", "-q", "buildah", "podman", "debootstrap")
        except RuntimeError:  # a fresh machine may have no package lists yet
            sh("apt-get", "update", "-q")
            sh("apt-get", "install", "-y", "-q", "buildah", "podman", "debootstrap")


def ensure_base() -> None:
    if subprocess.run(["podman", "image", "exists", BASE]).returncode == 0:
        return
    print("making the base image with debootstrap ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        rootfs = Path(tmp) / "rootfs"
        sh("debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm",
           str(rootfs), "http://deb.debian.org/debian")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        sh("podman", "import", "-", BASE, stdin=tar.stdout)
        tar.wait()


def remove_stale_images() -> None:
    """Images of earlier runs of this script: its tags, and the untagged images that re-tagging left."""
    for tag in TAGS:
        sh("podman", "rmi", "--force", tag, check=False)
    sh("podman", "image", "prune", "--force", "--filter", "label=org.opencontainers.image.title=photoz", check=False)


def free_gb() -> tuple[float, str]:
    """Free space, in GB, for a build: the least of the container storage's and buildah's temporary folder's
    (a commit writes the layer's blob there before storing it)."""
    graph_root = sh("podman", "info", "--format", "{{.Store.GraphRoot}}").strip() or "/var/lib/containers/storage"
    places = [Path(graph_root), Path(os.environ.get("TMPDIR", "/var/tmp"))]
    free = [(shutil.disk_usage(p if p.exists() else p.parent).free / 1e9, str(p)) for p in places]
    return min(free)


def resolve_gpu_requirements(tag: str) -> dict:
    """Without building the GPU image: pip, inside the CPU image, resolves what the GPU variant would install
    (a dry run reads the wheels' metadata, not the wheels; the host's CA bundle is mounted, as for the build)."""
    ctr = Container(tag)
    try:
        report = json.loads(ctr.run("/opt/photoz/bin/pip", "install", "--dry-run", "--quiet", "--no-cache-dir",
                                    "--report", "-", GPU_REQUIREMENT, volumes=(f"{CA_BUNDLE}:{CA_BUNDLE}:ro",)))
    finally:
        ctr.remove()
    resolved = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in report["install"]}
    assert "onnxruntime-gpu" in resolved, resolved
    assert any(name.startswith("nvidia-cudnn") for name in resolved), resolved
    return resolved


class Build:
    """``buildah bud`` of one variant, running in the background from its start (its output in a file) until
    :meth:`wait`: the GPU image (mostly unpacking and committing gigabytes) builds while the CPU image is built
    and smoke-tested, about a minute less than one after the other on two cores."""

    def __init__(self, tag: str, variant: str, work: Path) -> None:
        print(f"building {tag} ...", flush=True)
        self.tag, self.log = tag, work / f"build-{variant}.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                ["buildah", "bud", "--isolation", "chroot", "--format", "docker", "--build-arg", f"BASE_IMAGE={BASE}",
                 "--build-arg", f"VARIANT={variant}", "-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro", "-t", tag, str(ROOT)],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)

    def wait(self) -> None:
        if self.proc.wait() != 0:
            raise RuntimeError(f"building {self.tag} failed ({self.proc.returncode}):\n{self.log.read_text()[-4000:]}")
        print(f"built {self.tag}", flush=True)


def image_config(tag: str) -> dict:
    return json.loads(sh("buildah", "inspect", "--type", "image", tag))["OCIv1"]["config"]


def image_size_mb(tag: str) -> float:
    return float(sh("podman", "image", "inspect", "--format", "{{.Size}}", tag).strip()) / 1e6


class Container:
    def __init__(self, tag: str):
        self.name = sh("buildah", "from", tag).strip()

    def run(self, *cmd, volumes: tuple[str, ...] = (), **kw) -> str:
        mounts = [arg for volume in volumes for arg in ("-v", volume)]
        return sh("buildah", "run", "--isolation", "chroot", "--network", "host", *mounts, self.name, "--", *cmd,
                  **kw)

    def start(self, cmd: list[str], log: Path) -> subprocess.Popen:
        return subprocess.Popen(["buildah", "run", "--isolation", "chroot", "--network", "host", self.name, "--",
                                 *cmd], stdout=open(log, "w"), stderr=subprocess.STDOUT)

    def remove(self) -> None:
        sh("buildah", "rm", self.name, check=False)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(log.read_text())


def serve_pid(cmd: list[str]) -> int:
    pids = sh("pgrep", "-f", " ".join(cmd[1:])).split()
    return int(pids[-1])


def smoke_cpu(tag: str, work: Path) -> dict:
    import httpx
    import numpy as np
    from astropy.io import fits

    cmd = image_config(tag)["Cmd"]
    assert cmd[:2] == ["photoz", "serve"], cmd
    ctr = Container(tag)
    try:
        uid = ctr.run("id", "-u").strip()
        assert uid != "0", f"image runs as root (uid {uid})"
        ctr.run("python3", "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)")
        log = work / "cpu-serve.log"
        proc = ctr.start(cmd, log)
        url = "http://127.0.0.1:" + cmd[cmd.index("--port") + 1]
        wait_ready(url, proc, log)
        cutout = np.random.default_rng(0).normal(0, 0.05, (5, 64, 64)).astype(np.float32)
        cutout[:, 28:36, 28:36] += 20
        buffer = io.BytesIO()
        fits.PrimaryHDU(cutout).writeto(buffer)
        response = httpx.post(url + "/v1/predict", content=buffer.getvalue(),
                              headers={"Content-Type": "application/fits"}, timeout=60)
        assert response.status_code == 200, response.text
        doc = response.json()
        pdf = np.array(doc["data"]["pdfs"][0])
        assert pdf.size == len(doc["meta"]["bins"]) - 1 and abs(pdf.sum() - 1) < 1e-4
        # the image serves the shipped bundle: the same numbers as the engine on the host
        from photoz.model.bundle import load_bundle
        from photoz.model.runtime import OnnxPredictor

        shipped = load_bundle(ROOT / "model" / "bundles" / "photoz-sdss-sim.onnx")
        assert doc["model"]["sha256"] == shipped.sha256, (doc["model"], shipped.sha256)
        host = OnnxPredictor(shipped, providers="cpu").predict_with_estimates(cutout[None], np.zeros(1, np.float32))
        assert abs(doc["ancil"]["z_mean"][0] - float(host["z_mean"][0])) < 1e-4, (doc["ancil"]["z_mean"], host)
        # the Open Inference Protocol from the image: binary tensor in, binary tensors out, the same numbers
        head = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 5, 64, 64],
                                       "parameters": {"binary_data_size": cutout.nbytes}}],
                           "outputs": [{"name": "z_mean", "parameters": {"binary_data": True}}]}).encode()
        oip = httpx.post(f"{url}/v2/models/{doc['model']['name']}/infer", content=head + cutout.tobytes(),
                         headers={"Inference-Header-Content-Length": str(len(head))}, timeout=60)
        assert oip.status_code == 200, oip.text
        json_length = int(oip.headers["inference-header-content-length"])
        z_mean = np.frombuffer(oip.content[json_length:], "<f4")
        assert z_mean.shape == (1,) and abs(z_mean[0] - doc["ancil"]["z_mean"][0]) < 1e-5, (z_mean, doc["ancil"])
        metrics = httpx.get(url + "/metrics").text
        assert 'photoz_requests_total{status="200"} 2.0' in metrics
        os.kill(serve_pid(cmd), signal.SIGTERM)
        code = proc.wait(60)
        text = log.read_text()
        assert code == 0, f"exit {code}:\n{text}"
        assert "draining" in text and "drained and stopped" in text, text
        return {"uid": uid, "z_mean": doc["ancil"]["z_mean"][0], "exit_code": code}
    finally:
        ctr.remove()


def smoke_gpu(tag: str, work: Path) -> dict:
    ctr = Container(tag)
    try:
        providers = ctr.run("python3", "-c", "import onnxruntime as ort; print(ort.get_available_providers())")
        assert "CUDAExecutionProvider" in providers, providers
        cmd = image_config(tag)["Cmd"]
        log = work / "gpu-serve.log"
        proc = ctr.start(cmd, log)
        url = "http://127.0.0.1:" + cmd[cmd.index("--port") + 1]
        wait_ready(url, proc, log)
        os.kill(serve_pid(cmd), signal.SIGTERM)
        proc.wait(60)
        text = log.read_text()
        assert "falling back to CPUExecutionProvider" in text, text
        return {"providers": providers.strip()}
    finally:
        ctr.remove()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="also build and check the CUDA image (several GB)")
    parser.add_argument("--gpu-min-free-gb", type=float, default=GPU_BUILD_PEAK_GB,
                        help="free disk (GB) below which the GPU image is not built and its requirements are "
                             "only resolved (default %(default)s: the build's measured peak and a margin)")
    args = parser.parse_args(argv)
    if not (ROOT / "model" / "bundles" / "photoz-sdss-sim.onnx").exists():
        print("no shipped bundle in model/bundles: nothing to put in the image", file=sys.stderr)
        return 1
    ensure_tools()
    ensure_base()
    remove_stale_images()
    report = {}
    with tempfile.TemporaryDirectory(prefix="photoz-docker-") as tmp:
        work = Path(tmp)
        gpu_build, gpu_later, gpu_skipped = None, False, ""
        if args.gpu:
            free, where = free_gb()
            if free >= args.gpu_min_free_gb + CPU_BUILD_PEAK_GB:  # room for both builds at once
                gpu_build = Build("photoz:gpu", "gpu", work)
            elif free >= args.gpu_min_free_gb:
                gpu_later = True
            else:
                gpu_skipped = (f"{where} has {free:.1f} GB free; building the GPU image needs about "
                               f"{args.gpu_min_free_gb:g} GB (--gpu-min-free-gb)")
        try:
            Build("photoz:cpu", "cpu", work).wait()
            report["cpu"] = {**smoke_cpu("photoz:cpu", work), "size_mb": round(image_size_mb("photoz:cpu"))}
            print(f"CPU image OK: {report['cpu']}", flush=True)
        except BaseException:
            if gpu_build is not None:
                gpu_build.proc.terminate()
                gpu_build.proc.wait()
            raise
        if gpu_later:
            gpu_build = Build("photoz:gpu", "gpu", work)
        if gpu_build is not None:
            gpu_build.wait()
            report["gpu"] = {**smoke_gpu("photoz:gpu", work), "size_mb": round(image_size_mb("photoz:gpu"))}
            print(f"GPU image OK: {report['gpu']}", flush=True)
        elif gpu_skipped:
            print(f"GPU image NOT BUILT: {gpu_skipped}. Resolving its requirements instead ...", flush=True)
            resolved = resolve_gpu_requirements("photoz:cpu")
            report["gpu"] = {"built": False, "reason": gpu_skipped, "resolved": resolved}
            print(f"GPU requirements resolve: {resolved}", flush=True)
    out = ROOT / "benchmarks" / "results" / "docker-images.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
