"""End-to-end fixtures: the real `sluice-launcher` serving the default model on a free port.

Each test module shares one server (starting one costs a model load and a warmup). The
launcher converts the default model once into ~/.cache/sluice, so only the first run pays for it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
STARTUP_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SluiceServer:
    """A running launcher with its router and shard."""

    url: str
    process: subprocess.Popen
    log_path: Path
    flags: list[str] = field(default_factory=list)

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def start_server(
    *extra_flags: str,
    dtype: str = "float32",
    model_id: str = DEFAULT_MODEL,
    env: dict[str, str] | None = None,
) -> SluiceServer:
    """Starts the launcher; `env` replaces its environment when given."""
    launcher = shutil.which("sluice-launcher")
    if launcher is None:
        raise RuntimeError("sluice-launcher is not on PATH: run `make install` first")
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="sluice-it-"))
    log_path = workdir / "launcher.log"
    # fmt: off
    flags = [
        "--model-id", model_id,
        "--hostname", "127.0.0.1",
        "--port", str(port),
        "--shard-uds-path", str(workdir / "shard"),
        # Exact-output tests need float32: in bfloat16 the default model has near ties.
        "--dtype", dtype,
        *extra_flags,
    ]
    # fmt: on
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [launcher, *flags],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    server = SluiceServer(f"http://127.0.0.1:{port}", process, log_path, flags)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"launcher exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if requests.get(f"{server.url}/health", timeout=5).status_code == 200:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(1)
    server.stop()
    raise RuntimeError(f"server not healthy after {STARTUP_TIMEOUT_S}s:\n{server.log_tail()}")


def serve(
    *flags: str,
    dtype: str = "float32",
    model_id: str = DEFAULT_MODEL,
    env: dict[str, str] | None = None,
) -> Iterator[SluiceServer]:
    """Runs a server for the length of a fixture and checks that it stops cleanly."""
    running = start_server(*flags, dtype=dtype, model_id=model_id, env=env)
    yield running
    code = running.stop()
    assert code == 0, f"launcher exited with {code} on SIGTERM:\n{running.log_tail()}"


@pytest.fixture(scope="module")
def server() -> Iterator[SluiceServer]:
    """One server per test module; modules that need other flags override this fixture."""
    yield from serve("--max-input-tokens", "256", "--max-total-tokens", "512")


def metric(server: SluiceServer, name: str) -> float:
    """The value of an unlabelled counter or gauge on /metrics (0 if not reported yet)."""
    for line in requests.get(f"{server.url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The default model as a safetensors directory, converted from its GGUF file as the
    launcher converts it, into the same cache, if no launcher has yet."""
    cache = Path(os.environ.get("SLUICE_CACHE", Path.home() / ".cache" / "sluice"))
    directory = cache / "models" / "SmolLM2-135M-Instruct"
    if not (directory / "config.json").is_file():
        gguf = subprocess.run(
            ["sluice-server", "default-model-gguf"], check=True, capture_output=True, text=True
        ).stdout.strip()
        subprocess.run(["sluice-server", "convert-gguf", gguf, str(directory)], check=True)
    return directory


@pytest.fixture(scope="module")
def chat_prompt(server: SluiceServer) -> callable:
    """Formats a user message with the default model's own chat template (the launcher has
    converted the model into the cache by the time `server` is up)."""
    from transformers import AutoTokenizer

    cache = Path(os.environ.get("SLUICE_CACHE", Path.home() / ".cache" / "sluice"))
    tokenizer = AutoTokenizer.from_pretrained(cache / "models" / "SmolLM2-135M-Instruct")

    def format_prompt(message: str) -> str:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )

    return format_prompt
