"""bfloat16, the dtype `--dtype auto` picks on CPUs with native bfloat16 or AVX2, end to end: the
path with Sluice's own bfloat16 matmul, which the float32 modules do not take; and the default
model quantized in bfloat16, its GGUF file (whose 4-bit codes AVX512-BF16 CPUs without AMX
multiply by bfloat16 dot products), `--quantize fp8` (whose codes AVX512-BF16 CPUs convert to
bfloat16 for dot products, or for AMX's tiles where the CPU has them) and `--quantize
bitsandbytes-nf4` (whose levels AVX512-BF16 CPUs look up in bfloat16, for the same), an
8-bit KV cache (`--kv-cache-dtype fp8_e4m3fn`, whose codes AVX512-BF16 CPUs widen to bfloat16
for attention's dot products), and the paths of a CPU without AVX-512 on any AVX2 CPU
(`SLUICE_MAX_CPU_ISA=avx2`); the float32 quantized modules take other paths."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import SluiceServer, serve
from helpers import generate


def _cpu_runs_sluice_bfloat16_matmul() -> bool:
    """AVX512-BF16, or AVX2 with FMA (the flags as Linux names them)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return "avx512_bf16" in flags or {"avx2", "fma"} <= flags


@pytest.fixture(
    scope="module",
    params=["unquantized", "gguf", "fp8", "bitsandbytes-nf4", "fp8-kv-cache", "avx2-paths"],
)
def server(request: pytest.FixtureRequest) -> Iterator[SluiceServer]:
    if not _cpu_runs_sluice_bfloat16_matmul():
        # The path under test is Sluice's own bfloat16 matmul, which needs one of them.
        pytest.skip("needs AVX512-BF16 or AVX2 with FMA (this CPU lacks them)")
    quantize = {
        "unquantized": [],
        "avx2-paths": [],
        "fp8-kv-cache": ["--kv-cache-dtype", "fp8_e4m3fn"],
    }.get(request.param, ["--quantize", request.param])
    limits = ("--max-input-tokens", "256", "--max-total-tokens", "512")
    environment = (
        {**os.environ, "SLUICE_MAX_CPU_ISA": "avx2"} if request.param == "avx2-paths" else None
    )
    yield from serve(*limits, *quantize, dtype="bfloat16", env=environment)


def test_batched_requests_match_each_alone(server: SluiceServer, chat_prompt) -> None:
    """Every per-row operation of a step (projections, norms, each sequence's attention) gives
    a row the same result whatever else is in the batch, so greedy outputs are identical."""
    topics = ["rivers", "owls", "glass", "tea", "volcanoes", "honey", "trains", "music"]
    prompts = [chat_prompt(f"Tell me a fact about {topic}.") for topic in topics]
    solo = [generate(server, p, max_new_tokens=24) for p in prompts]
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        together = list(pool.map(lambda p: generate(server, p, max_new_tokens=24), prompts))
    assert [r["generated_text"] for r in together] == [r["generated_text"] for r in solo]
    assert len({r["generated_text"] for r in solo}) == len(prompts)


def test_the_shard_says_when_its_cpu_paths_are_capped(
    server: SluiceServer, request: pytest.FixtureRequest
) -> None:
    capped = request.node.callspec.params["server"] == "avx2-paths"
    log = server.log_path.read_text(errors="replace")
    assert ("SLUICE_MAX_CPU_ISA=avx2: CPU paths and kernels for x86-64-v3" in log) == capped, log
    assert ("(sluice_cpu_kernels_avx2)" in log) == capped, log
