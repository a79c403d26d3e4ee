"""Startup failures through the real launcher: one clear message and a non-zero exit code."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from conftest import DEFAULT_MODEL, free_port

STARTUP_TIMEOUT_S = 600


def run_launcher(
    *flags: str,
    port: int | None = None,
    socket_prefix: str | None = None,
    environment: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    launcher = shutil.which("sluice-launcher")
    assert launcher is not None, "sluice-launcher is not on PATH: run `make install` first"
    workdir = Path(tempfile.mkdtemp(prefix="sluice-it-"))
    # fmt: off
    command = [
        launcher,
        "--model-id", DEFAULT_MODEL,
        "--hostname", "127.0.0.1",
        "--port", str(port or free_port()),
        "--shard-uds-path", socket_prefix or str(workdir / "shard"),
        "--dtype", "float32",
        *flags,
    ]
    # fmt: on
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT_S,
        env=environment or dict(os.environ),
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
    assert "the KV cache holds 160 tokens, fewer than --max-total-tokens (512)" in output, output
    assert "lower --max-total-tokens" in output, output


def test_a_port_in_use_fails_before_the_model_loads() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_launcher(port=port)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f"port {port} on 127.0.0.1 is already in use" in output, output
    assert "started shard-0" not in output, output


def test_a_socket_directory_that_does_not_exist_fails_before_the_model_loads(
    tmp_path: Path,
) -> None:
    prefix = tmp_path / "missing" / "shard"
    result = run_launcher(socket_prefix=str(prefix))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f"the shards cannot create their sockets in {prefix.parent}" in output, output
    assert "started shard-0" not in output, output


def test_a_router_error_is_the_last_line_even_with_backtraces_on() -> None:
    # The router refuses an origin that is no header value once the shard is up; RUST_BACKTRACE
    # must not push its error out of the launcher's final message.
    result = run_launcher(
        "--cors-allow-origin", "https://a.example\x7f",
        environment={**os.environ, "RUST_BACKTRACE": "1"},
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    final = output.strip().splitlines()[-1]
    assert "sluice-router: error: --cors-allow-origin: not a valid origin" in final, final
