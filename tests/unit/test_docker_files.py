"""Static checks of Dockerfile, docker-compose.yml, README and docs/settings.md (no Docker engine needed)."""
import json
import re
import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
README = (ROOT / "README.md").read_text()
SETTINGS_DOC = (ROOT / "docs" / "settings.md").read_text()
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def instructions(name: str) -> list[str]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.upper().startswith(name + " ")]


def image_cmd() -> list[str]:
    return json.loads(instructions("CMD")[-1])


def test_every_copied_path_exists():
    sources = []
    for args in instructions("COPY"):
        if "--from=" in args:  # copies between build stages
            continue
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        sources += parts[:-1]
    assert sources, "no COPY found"
    for src in sources:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    assert "--from=build" in DOCKERFILE


def test_base_image_and_variant_are_build_arguments():
    assert DOCKERFILE.startswith("#") and "ARG BASE_IMAGE=" in DOCKERFILE
    assert DOCKERFILE.count("FROM ${BASE_IMAGE}") == 2
    assert "ARG VARIANT=cpu" in DOCKERFILE and 'onnxruntime-gpu[cuda,cudnn]' in DOCKERFILE


def test_start_command_is_the_one_the_readme_documents():
    cmd = " ".join(image_cmd())
    assert cmd == "photoz serve --host 0.0.0.0 --port 8000"
    assert cmd in README


def test_non_root_healthcheck_on_readyz():
    user = instructions("USER")[-1].strip()
    assert user not in ("root", "0")
    assert "/readyz" in instructions("HEALTHCHECK")[-1]
    assert instructions("EXPOSE") == ["8000"]


def test_compose_gpu_service_cpu_profile_healthcheck_and_port_agree():
    services = COMPOSE["services"]
    gpu, cpu = services["photoz"], services["photoz-cpu"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["build"]["args"]["VARIANT"] == "gpu" and cpu["build"]["args"]["VARIANT"] == "cpu"
    assert cpu["profiles"] == ["cpu"] and "profiles" not in gpu
    for service in (gpu, cpu):
        assert service["ports"] == ["8000:8000"]
        assert "/readyz" in " ".join(service["healthcheck"]["test"])
        assert "command" not in service  # the image's CMD, as documented
    assert "docker compose up" in README and "docker compose --profile cpu up photoz-cpu" in README


def test_every_setting_is_documented():
    from photoz.service.settings import Settings

    for name in Settings.model_fields:
        assert f"PHOTOZ_{name.upper()}" in SETTINGS_DOC, name


def test_readme_settings_defaults_match_the_code():
    from photoz.service.settings import Settings

    rows = re.findall(r"^\| `(PHOTOZ_[A-Z_]+)` \| `([^`]*)` \|", SETTINGS_DOC, re.M)
    assert len(rows) >= 10
    for variable, documented in rows:
        name = variable.removeprefix("PHOTOZ_").lower()
        default = Settings.model_fields[name].default
        if isinstance(default, bool):
            assert documented == str(default).lower(), variable
        elif isinstance(default, (int, float)):
            assert float(documented) == float(default), variable
        elif name == "model":
            assert str(default).endswith(documented), variable
        else:
            assert documented == str(default), variable


def test_docker_smoke_resolves_the_gpu_requirement_the_dockerfile_installs():
    """When the disk is too small for the GPU image, make docker-test resolves its requirements instead: the
    same requirement string, or the fallback checks something the image does not install."""
    from tests.e2e.docker_smoke import GPU_REQUIREMENT

    installs = re.findall(r'pip install --no-cache-dir "(onnxruntime-gpu[^"]*)"', DOCKERFILE)
    assert installs == [GPU_REQUIREMENT]
