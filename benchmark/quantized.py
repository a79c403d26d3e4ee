"""Output tok/s and weight memory of the default model served quantized against the same model
in bfloat16, one request at a time and 32 at a time, the servers taking turns round after round
in one run (this machine's speed drifts over minutes; alternating spreads the drift over all).

- bfloat16: the weights expanded from the default model's GGUF file;
- gguf: `--quantize gguf`, the file's Q4_1 projections and Q8_0 LM head as stored;
- awq, gptq, gptq-8bit: the expanded weights quantized by round-to-nearest into AWQ's and GPTQ's
  checkpoint layouts (server/tests/packed_checkpoints.py; GPTQ in act-order), per group of 64;
- fp8-checkpoint: the expanded weights in compressed-tensors' FP8 format, scales per block of
  32 x 32 (server/tests/fp8_checkpoints.py);
- fp8, bitsandbytes, bitsandbytes-nf4, bitsandbytes-fp4: the expanded weights quantized at load
  (`--quantize`);
- llama.cpp: llama.cpp's llama-server (`--llama-script`, built on first use) on the same GGUF file
  as stored, the peer of `gguf`;
- kv-fp8_e4m3fn, kv-fp8_e5m2: bfloat16 weights, the KV cache in 8 bits (`--kv-cache-dtype`),
  which pays on long contexts rather than on the default 128 tokens.

All run bfloat16 activations; 128 prompt tokens, 128 output tokens, streamed, ignore_eos.

    python benchmark/quantized.py    # benchmark/results/quantized.json
    python benchmark/quantized.py --variants bfloat16 kv-fp8_e4m3fn --prompt-tokens 1024 \
        --concurrency 8 32 --results benchmark/results/kv-cache-8bit.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import machine
from run_all import BENCH, DEFAULT_MODEL, check_model, run_json, write_results
from servers import ExitedBeforeHealthy, Running, llama_server_spec, running, sluice_spec
from sluice_server.engine.kv_cache import KV_CACHE_DTYPES
from sluice_server.gguf_files import default_gguf_path

# Llama 3 8B: the projections' shapes (out, in) per layer, and the untied embeddings and LM head.
LLAMA3_8B = {
    "layers": 32,
    "projections": [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096)]
    + [(14336, 4096), (14336, 4096), (4096, 14336)],
    "vocab": 128256,
    "hidden": 4096,
}
# Per format: bits per weight as Sluice holds it in memory (codes plus a float32 scale and, with
# offsets, a float32 offset per group of 32 for GGUF, 128 as AWQ and GPTQ are usually published),
# and whether the LM head is quantized too (GGUF files quantize it; AWQ and GPTQ leave it).
BITS_PER_WEIGHT = {
    "bfloat16": (16.0, True),
    "GGUF Q8_0": (8 + 32 / 32, True),
    "GGUF Q4_0, Q4_1, Q4_K": (4 + 64 / 32, True),
    "AWQ / GPTQ 4-bit, groups of 128": (4 + 64 / 128, False),
    "GPTQ 8-bit, groups of 128": (8 + 64 / 128, False),
    # A float32 scale per output feature: 32 / 4096 bits per weight, at most.
    "FP8 per output feature, bitsandbytes int8": (8 + 32 / 4096, False),
    "FP8 blocks of 128 x 128 (held as groups of 128)": (8 + 32 / 128, False),
    "bitsandbytes NF4 / FP4, blocks of 64": (4 + 32 / 64, False),
}
WEIGHTS_LINE = re.compile(r"rank 0 holds ([\d.]+) MiB of weights")
SERVER_TESTS = BENCH.parent / "server" / "tests"
# llama-server's extra flags, tried in turn while it crashes at startup (see `serving`).
LLAMA_SERVER_FLAGS: tuple[tuple[str, ...], ...] = ((), ("--no-repack",))


@dataclass(frozen=True)
class Variant:
    flags: tuple[str, ...] = ()
    # The script (in server/tests) and its arguments that write a checkpoint quantized from the
    # default model; None: the default model itself.
    checkpoint: tuple[str, ...] | None = None
    # Served by llama.cpp's llama-server from the default model's GGUF file instead of Sluice.
    llama_server: bool = False


def packed(*args: str) -> tuple[str, ...]:
    return ("packed_checkpoints.py", *args)


VARIANTS = {
    "bfloat16": Variant(),
    "gguf": Variant(flags=("--quantize", "gguf")),
    "awq": Variant(checkpoint=packed("awq", "--group-size", "64")),
    "gptq": Variant(checkpoint=packed("gptq", "--group-size", "64", "--act-order")),
    "gptq-8bit": Variant(checkpoint=packed("gptq", "--bits", "8", "--group-size", "64")),
    "fp8-checkpoint": Variant(checkpoint=("fp8_checkpoints.py", "block")),
    **{
        method: Variant(flags=("--quantize", method))
        for method in ("fp8", "bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4")
    },
    "llama.cpp": Variant(llama_server=True),
    **{f"kv-{dtype}": Variant(flags=("--kv-cache-dtype", dtype)) for dtype in KV_CACHE_DTYPES},
}


def model_id(args: argparse.Namespace, variant: Variant) -> str:
    """The default model by name (so that the launcher knows its GGUF file), or a checkpoint
    quantized from it, written on first use."""
    if variant.checkpoint is None:
        return args.model_id
    script, *script_args = variant.checkpoint
    # packed_checkpoints.py's arguments start with the method.
    named_by = script_args if script == "packed_checkpoints.py" else ["fp8", *script_args]
    out = args.checkpoints / "-".join(named_by).replace("--", "")
    if not (out / "config.json").is_file():
        if script == "packed_checkpoints.py":  # its method comes before the directories
            method, *script_args = script_args
            script_args = [method, str(args.model), str(out), *script_args]
        else:
            script_args = [str(args.model), str(out), *script_args]
        subprocess.run([sys.executable, str(SERVER_TESTS / script), *script_args], check=True)
    return str(out)


def log(message: str) -> None:
    print(f"[quantized {time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextlib.contextmanager
def serving(
    args: argparse.Namespace, variant: str, log_path: Path
) -> Iterator[tuple[Running, tuple[str, ...]]]:
    """The variant's server, healthy, and the flags a crashed start made it add (none: it
    started as the variant says).

    llama-server repacks Q4 weights at load for its own matmuls; on some CPUs (seen on Xeons with
    AMX) that repacking crashes it before it is healthy. It is then started once more without
    repacking (`--no-repack`), and the flag is recorded with the results."""
    chosen = VARIANTS[variant]
    if not chosen.llama_server:
        spec = sluice_spec(Path(model_id(args, chosen)), "bfloat16", log_path, 600)
        with running(replace(spec, argv=[*spec.argv, *chosen.flags])) as server:
            yield server, ()
        return
    context = args.prompt_tokens + args.output_tokens + 64
    for flags in LLAMA_SERVER_FLAGS:
        spec = llama_server_spec(
            args.llama_script, default_gguf_path(), max(args.concurrency), context, log_path,
            600, flags,
        )
        with contextlib.ExitStack() as stack:
            try:
                server = stack.enter_context(running(spec))
            except ExitedBeforeHealthy as e:
                if e.returncode >= 0 or flags == LLAMA_SERVER_FLAGS[-1]:
                    raise
                log(f"llama-server crashed at startup (signal {-e.returncode}); again with "
                    f"{shlex.join(LLAMA_SERVER_FLAGS[-1])}")
                continue
            yield server, flags
            return


def measure(args: argparse.Namespace, variant: str, round_number: int) -> dict[str, Any]:
    logs = args.results.parent / "logs"
    # quantized.json's logs: quantized-VARIANT.log and quantized-VARIANT-load.log.
    log_path = logs / f"{args.results.stem}-{variant}.log"
    # llama-server does not log its weights' size: the file's (weights and vocabulary) stands in.
    file_mib = None
    if VARIANTS[variant].llama_server:
        file_mib = default_gguf_path().stat().st_size / 2**20
    log(f"round {round_number}: {variant} (log: {log_path})")
    levels = {}
    with serving(args, variant, log_path) as (server, retried_with):
        for concurrency in args.concurrency:
            # fmt: off
            levels[concurrency] = run_json(
                [
                    sys.executable, str(BENCH / "load.py"),
                    "--url", server.spec.url,
                    "--route", "completions", "--ignore-eos",
                    "--tokenizer", str(args.model),
                    "--concurrency", str(concurrency),
                    "--requests", str(max(args.min_requests, concurrency)),
                    "--prompt-tokens", str(args.prompt_tokens),
                    "--output-tokens", str(args.output_tokens),
                ],
                1800,
                logs / f"{args.results.stem}-{variant}-load.log",
            )
            # fmt: on
    weights = WEIGHTS_LINE.findall(log_path.read_text())
    weights_mib = float(weights[-1]) if weights else file_mib
    row = {
        "variant": variant,
        "round": round_number,
        "weights_mib": weights_mib,
        "retried_with": list(retried_with),
        "levels": {
            str(c): {
                k: level[k] for k in ("output_tokens_per_s", "ttft_p50_s", "itl_p50_s", "errors")
            }
            for c, level in levels.items()
        },
    }
    log(json.dumps(row))
    return row


def summarize(
    rows: list[dict[str, Any]], variants: list[str], concurrency: list[int]
) -> dict[str, Any]:
    """Per variant: the median over rounds of each level's output tok/s."""
    summary: dict[str, Any] = {}
    for variant in variants:
        mine = [row for row in rows if row["variant"] == variant]
        summary[variant] = {
            "weights_mib": mine[-1]["weights_mib"] if mine else None,
            "output_tokens_per_s": {
                str(c): statistics.median(r["levels"][str(c)]["output_tokens_per_s"] for r in mine)
                for c in concurrency
            },
        }
    return summary


def weight_memory_8b() -> dict[str, float]:
    """GiB of weights of a Llama 3 8B per format: the projections in the format, the LM head in
    it or in bfloat16, the embedding table in bfloat16 (a lookup reads one row per token)."""
    config = LLAMA3_8B
    projections = config["layers"] * sum(o * i for o, i in config["projections"])
    head = config["vocab"] * config["hidden"]
    return {
        name: (projections * bits / 8 + head * (bits if head_quantized else 16) / 8 + head * 2)
        / 2**30
        for name, (bits, head_quantized) in BITS_PER_WEIGHT.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model-id", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="its tokenizer's directory")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    p.add_argument("--min-requests", type=int, default=6)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--results", type=Path, default=BENCH / "results" / "quantized.json")
    p.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="to serve"
    )
    p.add_argument(
        "--llama-script",
        type=Path,
        default=BENCH.parent.parent / "shared" / "peers" / "llama-server.sh",
        help="the llama.cpp peer script (install, serve)",
    )
    p.add_argument(
        "--checkpoints",
        type=Path,
        default=Path.home() / ".cache" / "sluice" / "quantized-checkpoints",
        help="where the AWQ and GPTQ checkpoints are written",
    )
    a = p.parse_args()
    a.model = a.model.expanduser().resolve()
    check_model(a.model)
    rows = [
        measure(a, variant, number) for number in range(1, a.rounds + 1) for variant in a.variants
    ]
    results = {
        "generated_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmark/quantized.py", *sys.argv[1:]]),
        "machine": asdict(machine.describe(0, 0, "bfloat16")),
        "workload": {
            "prompt_tokens": a.prompt_tokens,
            "output_tokens": a.output_tokens,
            "concurrency": a.concurrency,
            "rounds": a.rounds,
        },
        "summary": summarize(rows, a.variants, a.concurrency),
        "llama3_8b_weight_gib": weight_memory_8b(),
        "rounds": rows,
    }
    write_results(a.results, results)
    log(f"wrote {a.results}")
    print(json.dumps(results["summary"]))


if __name__ == "__main__":
    main()
