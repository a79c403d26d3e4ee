"""The whole benchmark in one command: Sluice, vLLM and llama.cpp's server on every workload,
then the naive baseline, then a profile.

One after another, never two servers at once: describes the machine (its matmul peak and memory
bandwidth); starts Sluice and runs every workload's levels against it while sampling its process
tree's memory and reading its /metrics around each level; stops it; does the same with vLLM's CPU
build and llama.cpp's llama-server (the peer scripts in ../shared/peers; llama-server serves a
GGUF converted from the same model directory at Sluice's dtype); serves the default model
quantized by each method beside bfloat16 (quantized.py); runs baseline_transformers.py and
profile_step.py; writes benchmark/results/latest.json, docs/performance.png and
docs/performance.md. Every server answers through the same route, by default OpenAI's
/v1/completions (--route).

The workloads (`WORKLOADS`, chosen with --workloads): 128 prompt / 128 output tokens at 1, 8 and
32 concurrent requests; 1,024 / 128 at 8; a 16-turn chat replayed as growing prompts by 4
conversations at once (TTFT per turn; every server's prefix cache on); 4,096 / 256 at 4; 128 / 128
sampled at temperature 1 with top_p 0.9 at 1 and 32 (every other workload decodes greedily).

    make bench                                   # = .venv/bin/python benchmark/run_all.py
    python benchmark/run_all.py --quick          # a smoke test: tiny counts, short outputs
    python benchmark/run_all.py --skip-vllm --skip-llama
    python benchmark/run_all.py --route chat     # every server through /v1/chat/completions
    python benchmark/run_all.py --quantized gguf awq   # only these methods (bfloat16 always)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report
import servers
from load import ROUTES, LevelResult, Target, make_prompts, run_chat, run_level
from machine import ISA_CAP_VARIABLES
from servers import (
    CpuMark,
    MemorySampler,
    Running,
    ServerSpec,
    free_port,
    http_get,
    llama_server_spec,
    running,
    sampling,
)

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
# Put on vLLM's PYTHONPATH when PyTorch is capped to AVX2 (see its sitecustomize.py).
AVX2_PEER = BENCH / "avx2_peer"

DEFAULT_MODEL = Path.home() / ".cache" / "sluice" / "models" / "SmolLM2-135M-Instruct"
# /metrics histograms whose mean per level makes the step-time breakdown.
STEP_HISTOGRAMS = {
    "shard_step_s": "sluice_shard_step_duration",
    "shard_forward_s": "sluice_shard_forward_duration",
    "router_step_s": "tgi_batch_inference_duration",
}
STEP_COUNTERS = {"steps": "sluice_steps_total", "decode_tokens": "sluice_decode_tokens_total"}
WARMUP_SEED_OFFSET = 100_000  # warm-up prompts must not be the measured ones (prefix cache)
SERVERS = ("sluice", "vllm", "llama")


@dataclass(frozen=True)
class Workload:
    """One shape of requests, measured at each of its concurrency levels."""

    name: str
    prompt_tokens: int  # a chat's: each user message's
    output_tokens: int  # a chat's: each answer's
    concurrency: tuple[int, ...]  # a chat's: conversations at once
    turns: int = 1  # above 1: a chat of this many turns, each prompt the whole conversation so far
    temperature: float = 0.0  # 0: greedy; else sampled, with top_p
    top_p: float = 1.0

    @property
    def is_chat(self) -> bool:
        return self.turns > 1

    @property
    def longest_request_tokens(self) -> int:
        """Prompt and output tokens of the longest request (a chat's last turn: every message
        and answer before it, plus a few template tokens per message)."""
        return self.turns * (self.prompt_tokens + self.output_tokens + 8)


# The short workload's shape comes from --prompt-tokens/--output-tokens/--concurrency.
WORKLOADS = {
    "long": Workload("1024/128", 1024, 128, (8,)),
    "chat": Workload("chat, 16 turns", 96, 64, (4,), turns=16),
    "longest": Workload("4096/256", 4096, 256, (4,)),
    # OpenAI's default temperature with a common top_p: what chat front-ends send.
    "sampled": Workload("128/128 sampled", 128, 128, (1, 32), temperature=1.0, top_p=0.9),
}


@dataclass(frozen=True)
class Settings:
    model_dir: Path
    workloads: tuple[Workload, ...]  # the first is the short one, compared with the baseline
    requests_factor: int
    min_requests: int
    warmup: int
    seed: int
    level_timeout_s: float
    sluice_startup_timeout_s: float
    peer_startup_timeout_s: float
    phase_timeout_s: float
    memory_period_s: float
    baseline_sequential: int
    baseline_batches: tuple[int, ...]
    profile_batch: int
    profile_steps: int
    matmul_size: int
    vllm_script: Path
    llama_script: Path
    skip_vllm: bool
    skip_llama: bool
    skip_baseline: bool
    skip_profile: bool
    rounds: int
    # quantized.py's variants, bfloat16 (the reference) first; empty: that phase is skipped.
    quantized_variants: tuple[str, ...]
    quantized_rounds: int
    route: str  # load.py's route, the same for every server
    # Each server at its fastest dtype on this CPU. Sluice: bfloat16 where the CPU computes in it
    # natively or Sluice's compiled matmul runs it (AVX2 without AVX-512). vLLM, the transformers
    # baseline and the matmul peak: bfloat16 only where native (emulated bfloat16 would handicap
    # them).
    sluice_dtype: str
    peer_dtype: str
    dtype_requested: str | None  # --dtype, which puts every server in one dtype
    quick: bool
    results: Path
    plot: Path
    doc: Path

    @property
    def short(self) -> Workload:
        return self.workloads[0]

    def requests_at(self, concurrency: int) -> int:
        return max(self.requests_factor * concurrency, self.min_requests)

    def skipped(self, server: str) -> bool:
        return (server == "vllm" and self.skip_vllm) or (server == "llama" and self.skip_llama)

    @property
    def context_per_request(self) -> int:
        """Tokens one request may need: the longest workload's, with room to spare."""
        return max(w.longest_request_tokens for w in self.workloads) + 256

    @property
    def logs(self) -> Path:
        return self.results.parent / "logs"


# --- helpers ---------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[run_all {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_json(argv: list[str], timeout_s: float, log_path: Path) -> dict[str, Any]:
    """Runs a script and returns the first JSON object it prints; the whole output goes to a log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    mark = CpuMark.now(os.getpid())
    with log_path.open("w") as out:
        done = subprocess.run(
            argv,
            check=False,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=timeout_s,
            cwd=REPO,
            start_new_session=True,
        )
    text = log_path.read_text(errors="replace")
    if done.returncode != 0:
        raise RuntimeError(
            f"{Path(argv[1]).name} exited with {done.returncode}: "
            f"{text.strip().splitlines()[-1:] or ''}"
        )
    line = next((ln for ln in text.splitlines() if ln.startswith("{")), None)
    if line is None:
        raise RuntimeError(f"{Path(argv[1]).name} printed no JSON (see {log_path})")
    return json.loads(line) | {"foreign_cpu_share": mark.foreign_share()}


def model_size(model_dir: Path) -> dict[str, Any]:
    """Parameter counts from config.json and the safetensors headers (no weights are read)."""
    config = json.loads((model_dir / "config.json").read_text())
    shapes: dict[str, list[int]] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with file.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    embed = sum(n for name, n in numel.items() if name.endswith("embed_tokens.weight"))
    has_head = any(name.endswith("lm_head.weight") for name in numel)
    total = sum(numel.values())
    # A decode step multiplies by every weight once, except the embedding table, which it only
    # indexes; a tied LM head is that same table used as a matmul, so it counts once.
    decode = total - embed + (embed if not has_head else 0)
    return {
        "path": str(model_dir),
        "total_params": total,
        "embedding_params": embed,
        "decode_params": decode,
        "tied_embeddings": bool(config.get("tie_word_embeddings")) and not has_head,
        "hidden_size": config.get("hidden_size"),
        "layers": config.get("num_hidden_layers"),
    }


# --- /metrics --------------------------------------------------------------------------------


def scrape(url: str) -> dict[str, float]:
    """Every sample of /metrics, summed over label sets: {'name': value}."""
    status, text = http_get(f"{url}/metrics", timeout_s=10)
    if status != 200:
        return {}
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            samples[name] = samples.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return samples


def step_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """The mean of each step histogram over the steps between two scrapes."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    means: dict[str, float | None] = {}
    for key, name in STEP_HISTOGRAMS.items():
        count = delta(f"{name}_count")
        means[key] = delta(f"{name}_sum") / count if count > 0 else None
    steps = delta(STEP_COUNTERS["steps"])
    means["steps"] = int(steps)
    tokens = delta(STEP_COUNTERS["decode_tokens"])
    means["decode_tokens_per_step"] = tokens / steps if steps else None
    return means


# --- one server ------------------------------------------------------------------------------


async def measure_levels(
    settings: Settings,
    server: Running,
    tokenizer: Tokenizer,
    sampler: MemorySampler,
    scrape_metrics: bool,
) -> list[dict[str, Any]]:
    short = settings.short
    warmup = make_prompts(
        tokenizer, settings.warmup, short.prompt_tokens, settings.seed + WARMUP_SEED_OFFSET
    )
    if warmup:
        log(f"{server.spec.name}: {len(warmup)} warm-up requests")
        target = target_for(settings, server, short)
        await asyncio.wait_for(run_level(target, warmup, len(warmup)), settings.level_timeout_s)
    results = []
    for index, workload in enumerate(settings.workloads):
        target = target_for(settings, server, workload)
        for concurrency in workload.concurrency:
            # A seed per level: no level finds its prompts in the prefix cache of an earlier one.
            seed = settings.seed + 1000 * index + concurrency
            before = scrape(server.spec.url) if scrape_metrics else {}
            sampler.take_peak()
            # This process's tree holds the client and the server: anything else competed.
            mark = CpuMark.now(os.getpid())
            level = await asyncio.wait_for(
                run_workload(settings, tokenizer, target, workload, concurrency, seed),
                settings.level_timeout_s,
            )
            foreign = mark.foreign_share()
            peak = sampler.take_peak()
            row = (
                {"workload": workload.name}
                | asdict(level)
                | {
                    "peak_rss_bytes": peak.rss_bytes,
                    "peak_pss_bytes": peak.pss_bytes,
                    "processes": peak.processes,
                    "foreign_cpu_share": foreign,
                }
            )
            if scrape_metrics:
                row["step_means"] = step_means(before, scrape(server.spec.url))
            log(
                f"{server.spec.name} {workload.name} c={concurrency}: "
                f"{level.output_tokens_per_s:.1f} tok/s, "
                f"TTFT p95 {level.ttft_p95_s * 1e3:.0f} ms, "
                f"ITL p50 {level.itl_p50_s * 1e3:.1f} ms, "
                f"{level.mean_output_tokens:.1f} tokens per answer (counted by: "
                f"{level.tokens_counted_from or '-'}), "
                f"errors {level.errors} {level.first_error[:200]}, "
                f"peak RSS {peak.rss_bytes / 2**30:.2f} GiB, other processes' CPU {foreign:.0%}"
            )
            results.append(row)
    return results


def target_for(settings: Settings, server: Running, workload: Workload) -> Target:
    # vLLM wants the path it serves as `model`; Sluice and llama-server ignore the field.
    return Target(
        server.spec.url,
        settings.route,
        str(settings.model_dir),
        workload.output_tokens,
        ignore_eos=True,
        temperature=workload.temperature,
        top_p=workload.top_p,
    )


async def run_workload(
    settings: Settings,
    tokenizer: Tokenizer,
    target: Target,
    workload: Workload,
    concurrency: int,
    seed: int,
) -> LevelResult:
    if not workload.is_chat:
        count = settings.requests_at(concurrency)
        prompts = make_prompts(tokenizer, count, workload.prompt_tokens, seed)
        return await run_level(target, prompts, concurrency)
    # As many conversations as run at once: every conversation is in flight from start to end.
    messages = make_prompts(tokenizer, concurrency * workload.turns, workload.prompt_tokens, seed)
    conversations = [
        messages[i * workload.turns : (i + 1) * workload.turns] for i in range(concurrency)
    ]
    return await run_chat(target, conversations, concurrency)


def benchmark_server(settings: Settings, spec: ServerSpec, scrape_metrics: bool) -> dict[str, Any]:
    tokenizer = Tokenizer.from_file(str(settings.model_dir / "tokenizer.json"))
    log(f"starting {spec.name} (log: {spec.log})")
    with running(spec) as server:
        log(f"{spec.name} healthy after {server.startup_s:.0f} s")
        with sampling(server.process.pid, settings.memory_period_s) as sampler:
            idle = sampler.take_peak()
            level_rows = asyncio.run(
                measure_levels(settings, server, tokenizer, sampler, scrape_metrics)
            )
    log(f"{spec.name} stopped")
    return {
        "argv": spec.argv,
        "route": settings.route,
        "startup_s": round(server.startup_s, 1),
        "idle_rss_bytes": idle.rss_bytes,
        "idle_pss_bytes": idle.pss_bytes,
        "levels": level_rows,
        "peak_rss_bytes": max((r["peak_rss_bytes"] for r in level_rows), default=0),
    }


def _median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One level's results over the rounds: the median of every measurement, the worst errors and
    memory."""
    row: dict[str, Any] = {}
    for key, first in rows[0].items():
        values = [r[key] for r in rows if key in r]
        if key in ("errors",):
            row[key] = sum(values)
        elif key.startswith("peak_") or key in ("processes", "foreign_cpu_share"):
            row[key] = max(values)
        elif key == "first_error":
            row[key] = next((v for v in values if v), "")
        elif isinstance(first, dict):
            row[key] = _median_row(values)
        elif isinstance(first, list) and values and all(len(v) == len(first) for v in values):
            row[key] = [statistics.median(column) for column in zip(*values, strict=True)]
        elif isinstance(first, (int, float)) and not isinstance(first, bool) and None not in values:
            row[key] = statistics.median(values)
        else:
            row[key] = first
    return row


def combine_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """A server's results over all rounds: per level the median of each measurement (and every
    round's throughput, in `rounds_output_tokens_per_s`); the first failure if any round failed."""
    failed = next((r for r in rounds if "error" in r), None)
    if failed or not rounds:
        return failed or {"error": "no round ran"}
    combined = dict(rounds[0])
    combined["levels"] = []
    for index in range(len(rounds[0]["levels"])):
        rows = [r["levels"][index] for r in rounds]
        level = _median_row(rows)
        level["rounds_output_tokens_per_s"] = [r["output_tokens_per_s"] for r in rows]
        combined["levels"].append(level)
    combined["startup_s"] = statistics.median(r["startup_s"] for r in rounds)
    combined["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in rounds)
    combined["rounds"] = len(rounds)
    return combined


def benchmark_server_named(settings: Settings, server: str) -> dict[str, Any]:
    # Sluice's /metrics give the step-time breakdown; the peers' are not read.
    return benchmark_server(settings, SPECS[server](settings), scrape_metrics=server == "sluice")


def sluice_spec(settings: Settings) -> ServerSpec:
    return servers.sluice_spec(
        settings.model_dir,
        settings.sluice_dtype,
        settings.logs / "sluice.log",
        settings.sluice_startup_timeout_s,
    )


def vllm_spec(settings: Settings) -> ServerSpec:
    port = free_port()
    # fmt: off
    argv = [
        "bash",
        str(settings.vllm_script),
        "serve",
        str(settings.model_dir),
        "--port", str(port),
        "--host", "127.0.0.1",
        "--enable-prefix-caching",
    ]
    # fmt: on
    env = {**os.environ, "VLLM_DTYPE": settings.peer_dtype}
    if os.environ.get("ATEN_CPU_CAPABILITY") == "avx2":
        # vLLM picks its kernels from PyTorch's CPU checks, which this cap does not reach.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(AVX2_PEER), env.get("PYTHONPATH")]))
    return ServerSpec(
        "vllm",
        argv,
        port,
        env,
        settings.logs / "vllm.log",
        settings.peer_startup_timeout_s,
        term_group=True,
    )


def llama_gguf(settings: Settings) -> Path:
    """The model directory's weights as a GGUF at Sluice's dtype, converted once by the peer
    script (llama.cpp's own converter) and kept beside the model directory."""
    kind = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}[settings.sluice_dtype]
    gguf = settings.model_dir.parent / f"{settings.model_dir.name}-{kind}.gguf"
    if not gguf.exists():
        log(f"converting {settings.model_dir} to {gguf}")
        partial = gguf.with_suffix(".partial")
        argv = ["bash", str(settings.llama_script), "gguf", str(settings.model_dir)]
        subprocess.run(
            [*argv, str(partial), kind],
            check=True,
            env={**os.environ, "PYTHON": sys.executable},
            stdout=subprocess.DEVNULL,
            timeout=settings.phase_timeout_s,
        )
        partial.replace(gguf)
    return gguf


def llama_spec(settings: Settings) -> ServerSpec:
    return llama_server_spec(
        settings.llama_script,
        llama_gguf(settings),
        max(c for w in settings.workloads for c in w.concurrency),
        settings.context_per_request,
        settings.logs / "llama.log",
        settings.peer_startup_timeout_s,
    )


SPECS = {"sluice": sluice_spec, "vllm": vllm_spec, "llama": llama_spec}


# --- the other phases ------------------------------------------------------------------------


def machine(settings: Settings) -> dict[str, Any]:
    # fmt: off
    argv = [
        sys.executable, str(BENCH / "machine.py"),
        "--matmul-size", str(settings.matmul_size),
        # The dtype torch.matmul is fastest in: what the CPU's FMA units peak at.
        "--dtype", settings.peer_dtype,
    ]
    # fmt: on
    return run_json(argv, settings.phase_timeout_s, settings.logs / "machine.log")


def baseline(settings: Settings) -> dict[str, Any]:
    # fmt: off
    argv = [
        sys.executable,
        str(BENCH / "baseline_transformers.py"),
        "--model", str(settings.model_dir),
        "--prompt-tokens", str(settings.short.prompt_tokens),
        "--new-tokens", str(settings.short.output_tokens),
        "--sequential", str(settings.baseline_sequential),
        "--batch-sizes", *map(str, settings.baseline_batches),
        "--seed", str(settings.seed),
        "--dtype", settings.peer_dtype,
    ]
    # fmt: on
    return run_json(argv, settings.phase_timeout_s, settings.logs / "baseline.log")


def profile(settings: Settings) -> dict[str, Any]:
    # fmt: off
    argv = [
        sys.executable,
        str(BENCH / "profile_step.py"),
        "--model", str(settings.model_dir),
        "--dtype", settings.sluice_dtype,
        "--batch", str(settings.profile_batch),
        "--prompt-tokens", str(settings.short.prompt_tokens),
        "--steps", str(settings.profile_steps),
    ]
    # fmt: on
    return run_json(argv, settings.phase_timeout_s, settings.logs / "profile_step.log")


def quantized(settings: Settings) -> dict[str, Any]:
    """The default model served by each quantization method and in bfloat16, taking turns
    (quantized.py); its whole results file, which report.py renders."""
    short = settings.short
    path = settings.results.parent / report.QUANTIZED_FILE
    # fmt: off
    argv = [
        sys.executable, str(BENCH / "quantized.py"),
        "--model", str(settings.model_dir),
        "--rounds", str(settings.quantized_rounds),
        "--variants", *settings.quantized_variants,
        "--concurrency", *(["1", "2"] if settings.quick else ["1", "32"]),
        "--min-requests", str(settings.min_requests),
        "--prompt-tokens", str(short.prompt_tokens),
        "--output-tokens", str(short.output_tokens),
        "--llama-script", str(settings.llama_script),
        "--results", str(path),
    ]
    # fmt: on
    # Each variant: a start (a checkpoint written on first use) and two levels, per round.
    timeout_s = 900.0 * len(settings.quantized_variants) * settings.quantized_rounds
    run_json(argv, timeout_s, settings.logs / "quantized.log")
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    return json.loads(path.read_text()) | {"results_file": str(shown)}


def phase(name: str, errors: list[str], fn: Any, *args: Any) -> dict[str, Any]:
    """Runs one part; a failure is recorded and the run goes on, so one bad part costs no other."""
    log(f"--- {name}")
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - any failure is a result to record
        message = f"{name}: {type(e).__name__}: {e}"
        log(message)
        errors.append(message)
        return {"error": message}


# --- main ------------------------------------------------------------------------------------


def run(settings: Settings, command: str) -> dict[str, Any]:
    errors: list[str] = []
    results: dict[str, Any] = {
        "generated_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "quick": settings.quick,
        "command": command,
        "results_file": str(
            settings.results.relative_to(REPO)
            if settings.results.is_relative_to(REPO)
            else settings.results
        ),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        "model": model_size(settings.model_dir),
        "machine": phase("machine", errors, machine, settings),
        "servers": {},
    }
    # The servers take turns, round after round: this machine's speed drifts by 10-20% over
    # minutes, and alternating spreads that drift over all instead of favouring one.
    measured = [server for server in SERVERS if not settings.skipped(server)]
    rounds: dict[str, list[dict[str, Any]]] = {server: [] for server in measured}
    for number in range(1, settings.rounds + 1):
        log(f"=== round {number} of {settings.rounds}")
        for server in measured:
            rounds[server].append(phase(server, errors, benchmark_server_named, settings, server))
    for server in SERVERS:
        results["servers"][server] = (
            combine_rounds(rounds[server]) if server in rounds else {"skipped": f"--skip-{server}"}
        )
    results["quantized"] = (
        {"skipped": "--quantized without methods, or a model other than the default"}
        if not settings.quantized_variants
        else phase("quantized", errors, quantized, settings)
    )
    results["baseline"] = (
        {"skipped": "--skip-baseline"}
        if settings.skip_baseline
        else phase("baseline", errors, baseline, settings)
    )
    results["profile_step"] = (
        {"skipped": "--skip-profile"}
        if settings.skip_profile
        else phase("profile_step", errors, profile, settings)
    )
    results["errors"] = errors
    return results


def write_results(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written through a temporary file so that an interrupted run leaves the old results whole.
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as tmp:
        json.dump(results, tmp, indent=2)
    Path(tmp.name).replace(path)


def write_outputs(settings: Settings, results: dict[str, Any]) -> None:
    write_results(settings.results, results)
    report.write(results, settings.doc, settings.plot, extras=settings.results.parent)
    log(f"wrote {settings.results}, {settings.doc}, {settings.plot}")


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a safetensors directory")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: tiny counts, 16 output tokens, results under "
        "benchmark/results/quick/ unless --results/--doc/--plot say otherwise",
    )
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--skip-llama", action="store_true")
    p.add_argument(
        "--workloads",
        nargs="*",
        choices=sorted(WORKLOADS),
        default=list(WORKLOADS),
        help="workloads besides the short one (--prompt-tokens/--output-tokens/--concurrency)",
    )
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument(
        "--quantized",
        nargs="*",
        choices=quantized_variants(),
        help="the quantization methods served beside bfloat16, on the default model only "
        "(benchmark/quantized.py); none: `--quantized` alone. Default: every one, "
        "llama.cpp's server on the same GGUF file unless --skip-llama; gguf with --quick",
    )
    p.add_argument(
        "--quantized-rounds", type=int, help="rounds of the quantized servers; default 2, 1 --quick"
    )
    p.add_argument("--skip-profile", action="store_true")
    p.add_argument(
        "--rounds",
        type=int,
        help="times each server is started and measured, taking turns; the report "
        "gives the median per level (default 3, 1 with --quick)",
    )
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        help="every server in this dtype; default: each at its fastest on this CPU (Sluice: "
        "bfloat16 with AVX512-BF16, AMX, or AVX2 without AVX-512; the others: bfloat16 with "
        "AVX512-BF16 or AMX; else float32)",
    )
    p.add_argument(
        "--route",
        choices=ROUTES,
        default="completions",
        help="the route every server is measured through: OpenAI's /v1/completions or "
        "/v1/chat/completions, or TGI's /generate_stream (Sluice only: the peers lack it)",
    )
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument(
        "--output-tokens",
        type=int,
        help="the short workload's; default 128, 16 with --quick (which also cuts every "
        "other workload's outputs to 16 and a chat to 3 turns)",
    )
    p.add_argument(
        "--requests-factor",
        type=int,
        help="requests per level = max(factor × concurrency, --min-requests); "
        "default 2, 1 with --quick",
    )
    p.add_argument(
        "--min-requests",
        type=int,
        help="default 16 (a p95 of 8 requests is their slowest), 2 with --quick",
    )
    p.add_argument("--warmup", type=int, help="warm-up requests per server; default 4, 2 --quick")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--level-timeout", type=float, default=1800.0, help="seconds per level")
    p.add_argument("--sluice-startup-timeout", type=float, default=600.0)
    p.add_argument("--peer-startup-timeout", type=float, default=600.0)
    p.add_argument(
        "--phase-timeout",
        type=float,
        default=1800.0,
        help="seconds for each of machine.py, the baseline and profile_step.py",
    )
    p.add_argument("--memory-period", type=float, default=0.5, help="seconds between samples")
    p.add_argument("--baseline-sequential", type=int, help="default 4, 1 with --quick")
    p.add_argument("--baseline-batches", type=int, nargs="*", default=[8, 32])
    p.add_argument("--profile-batch", type=int, default=32)
    p.add_argument("--profile-steps", type=int, help="default 40, 10 with --quick")
    p.add_argument("--matmul-size", type=int, help="default 4096, 2048 with --quick")
    p.add_argument(
        "--vllm-script", type=Path, default=REPO.parent / "shared" / "peers" / "vllm-cpu.sh"
    )
    p.add_argument(
        "--llama-script",
        type=Path,
        default=REPO.parent / "shared" / "peers" / "llama-server.sh",
    )
    p.add_argument("--results", type=Path, help="default benchmark/results/latest.json")
    p.add_argument("--doc", type=Path, help="default docs/performance.md")
    p.add_argument("--plot", type=Path, help="default docs/performance.png")
    a = p.parse_args(argv)

    def pick(value: Any, full: Any, quick: Any) -> Any:
        return value if value is not None else (quick if a.quick else full)

    if a.profile_steps is not None and a.profile_steps < 10:
        # profile_step.py's requests run out of tokens after 5 + steps + 10 profiled steps.
        p.error("--profile-steps must be at least 10")
    if a.route == "generate_stream" and not (a.skip_vllm and a.skip_llama):
        p.error(
            "the peers have no /generate_stream: add --skip-vllm --skip-llama, or pick an "
            "OpenAI route"
        )
    out = BENCH / "results" / "quick" if a.quick else None
    short = Workload(
        f"{a.prompt_tokens}/{pick(a.output_tokens, 128, 16)}",
        a.prompt_tokens,
        pick(a.output_tokens, 128, 16),
        tuple(a.concurrency),
    )
    others = [w for name, w in WORKLOADS.items() if name in a.workloads]
    if a.quick:
        others = [
            Workload(w.name, w.prompt_tokens, 16, w.concurrency, min(w.turns, 3)) for w in others
        ]
    return Settings(
        model_dir=a.model.expanduser().resolve(),
        workloads=(short, *others),
        requests_factor=pick(a.requests_factor, 2, 1),
        min_requests=pick(a.min_requests, 16, 2),
        warmup=pick(a.warmup, 4, 2),
        seed=a.seed,
        level_timeout_s=a.level_timeout,
        sluice_startup_timeout_s=a.sluice_startup_timeout,
        peer_startup_timeout_s=a.peer_startup_timeout,
        phase_timeout_s=a.phase_timeout,
        memory_period_s=a.memory_period,
        baseline_sequential=pick(a.baseline_sequential, 4, 1),
        baseline_batches=tuple(a.baseline_batches),
        profile_batch=a.profile_batch,
        profile_steps=pick(a.profile_steps, 40, 10),
        matmul_size=pick(a.matmul_size, 4096, 2048),
        vllm_script=a.vllm_script,
        llama_script=a.llama_script,
        skip_vllm=a.skip_vllm,
        skip_llama=a.skip_llama,
        skip_baseline=a.skip_baseline,
        skip_profile=a.skip_profile,
        rounds=pick(a.rounds, 3, 1),
        quantized_variants=chosen_quantized(a),
        quantized_rounds=pick(a.quantized_rounds, 2, 1),
        route=a.route,
        sluice_dtype=a.dtype or fastest_dtype(sluice=True),
        peer_dtype=a.dtype or fastest_dtype(sluice=False),
        dtype_requested=a.dtype,
        quick=a.quick,
        results=(a.results or (out or BENCH / "results") / "latest.json").resolve(),
        plot=(
            a.plot or (out / "performance.png" if out else REPO / "docs/performance.png")
        ).resolve(),
        doc=(a.doc or (out / "performance.md" if out else REPO / "docs/performance.md")).resolve(),
    )


def quantized_variants() -> list[str]:
    import quantized  # imports this module: here rather than at the top

    # The 8-bit KV caches quantize no weights, and pay on long contexts (quantized.py's docs).
    return [variant for variant in quantized.VARIANTS if not variant.startswith("kv-")]


def chosen_quantized(a: argparse.Namespace) -> tuple[str, ...]:
    """quantized.py's variants to serve: bfloat16 first, as the reference, then the methods
    chosen; none on another model than the default (the methods quantize its GGUF file)."""
    if a.model.expanduser().resolve() != DEFAULT_MODEL.resolve():
        return ()
    if a.quantized is None:
        chosen = ["gguf"] if a.quick else quantized_variants()
        if a.skip_llama:
            chosen = [v for v in chosen if v != "llama.cpp"]
    else:
        chosen = a.quantized
    methods = [v for v in chosen if v != "bfloat16"]
    return ("bfloat16", *methods) if methods else ()


def fastest_dtype(sluice: bool) -> str:
    from sluice_server.kernels.cpu_features import CpuFeatures

    # `make bench` installs Sluice with its compiled kernels; the peers have no such matmul.
    return CpuFeatures.detect().default_dtype_name(compiled_kernels=sluice)


def exit_on_sigterm(signum: int, _frame: object) -> None:
    # Turned into an exception so that the `finally` blocks stop the servers.
    raise SystemExit(128 + signum)


def check_model(model_dir: Path) -> None:
    missing = [n for n in ("config.json", "tokenizer.json") if not (model_dir / n).exists()]
    if missing or not any(model_dir.glob("*.safetensors")):
        raise SystemExit(
            f"{model_dir} is not a safetensors model directory (missing "
            f"{', '.join(missing) or '*.safetensors'}); for the default model, run "
            "`sluice-launcher` once: it converts the model there."
        )


def main() -> None:
    settings = parse_args()
    check_model(settings.model_dir)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    command = (
        "make bench"
        if not sys.argv[1:]
        else shlex.join(["python", "benchmark/run_all.py", *sys.argv[1:]])
    )
    # The variables that change what the servers run, as a rerun must set them.
    settings_from_environment = [
        f"{name}={shlex.quote(os.environ[name])}"
        for name in (*ISA_CAP_VARIABLES, "LLAMA_PEER_HOME")
        if os.environ.get(name)
    ]
    command = " ".join([*settings_from_environment, command])
    results = run(settings, command)
    write_outputs(settings, results)
    if results["errors"]:
        raise SystemExit(
            f"{len(results['errors'])} part(s) failed: "
            + "; ".join(e.splitlines()[0] for e in results["errors"])
        )


if __name__ == "__main__":
    main()
