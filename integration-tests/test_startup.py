"""Startup failures through the real launcher: one clear message and a non-zero exit code."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from conftest import DEFAULT_MODEL, free_port

STARTUP_TIMEOUT_S = 600


def run_launcher(*flags: str) -> subprocess.CompletedProcess[str]:
    launcher = shutil.which("sluice-launcher")
    assert launcher is not None, "sluice-launcher is not on PATH: run `make install` first"
    workdir = Path(tempfile.mkdtemp(prefix="sluice-it-"))
    # Backtraces would push the error line out of the launcher's summary of a child's stderr.
    environment = {k: v for k, v in os.environ.items() if k != "RUST_BACKTRACE"}
    # fmt: off
    command = [
        launcher,
        "--model-id", DEFAULT_MODEL,
        "--hostname", "127.0.0.1",
        "--port", str(free_port()),
        "--shard-uds-path", str(workdir / "shard"),
        "--dtype", "float32",
        *flags,
    ]
    # fmt: on
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT_S,
        env=environment,
        start_new_session=True,
    )


def test_a_max_total_tokens_the_kv_cache_cannot_hold_fails_with_what_would_fit() -> None:
    # float32 K/V of the default model: 30 layers x 2 x 3 heads x 64 x 4 bytes = 46,080 bytes per
    # token, so 8 MB hold 173 tokens: 10 whole blocks of 16.
    # fmt: off
    result = run_launcher(
        "--max-input-tokens", "256",
        "--max-total-tokens", "512",
        "--kv-cache-memory", "8MB",
    )
    # fmt: on
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "the KV cache fits 160 tokens" in output, output
    assert "fewer than one sequence of max_total_tokens=512" in output, output
    assert "lower --max-total-tokens" in output, output
