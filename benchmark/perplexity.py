"""Perplexity of the model as Sluice serves it, against `transformers` on the same tokens.

The text is tokenized once and cut into windows of `--window` tokens, without overlap (the last
one shorter). Per dtype:

- Sluice: the real launcher in that dtype; each window is sent as text to `POST /generate` with
  `decoder_input_details` and one new token, and `details.prefill` gives the logprob of every
  prompt token after the first. The ids the server reports there must be the window's ids, or
  the script stops: it compares the two sides on the same tokens or not at all.
- transformers: `AutoModelForCausalLM` from the same directory in that dtype, one forward pass
  per window, `log_softmax` of the logits in float32.

A window's first token has no preceding context in it, so it is scored on neither side.
Perplexity = exp(-mean logprob) over all scored tokens. The script writes
benchmark/results/perplexity.json, which report.py renders into docs/performance.md, and exits
non-zero when the two perplexities differ by more than `--tolerance` at any dtype.

The text (benchmark/data/perplexity.txt) is in the public domain: the Declaration of
Independence (1776), the first ten amendments to the Constitution of the United States (1791),
and Abraham Lincoln's Gettysburg Address (1863) and second inaugural address (1865), typed from
their published wording.

    python benchmark/perplexity.py
    python benchmark/perplexity.py --dtypes float32 --window 256
    python benchmark/perplexity.py --quantize gguf --results benchmark/results/perplexity-gguf.json

With `--quantize gguf` Sluice serves the default model from its GGUF file's quantized blocks
(the model is then named by its id, so that the launcher finds the file) while transformers
runs the directory the same file was expanded into: the two compute the same weights.

With `--quantize fp8|bitsandbytes|bitsandbytes-nf4|bitsandbytes-fp4` Sluice quantizes the
projections at load, and transformers runs a copy of the directory whose projections went through
the same quantizer and back (written under `--dequantized`): again the same weights.

With `--kv-cache-dtype fp8_e4m3fn|fp8_e5m2` Sluice keeps its KV cache in 8 bits, and
transformers runs the model as it is: the gap is the cost of the cache, so pass a `--tolerance`
that admits it:

    python benchmark/perplexity.py --kv-cache-dtype fp8_e4m3fn --tolerance 0.05 \
        --results benchmark/results/perplexity-kv-fp8_e4m3fn.json

With `--serve DIR` Sluice serves another directory than `--model`, which transformers runs: an
AWQ or GPTQ checkpoint against its weights dequantized, made with
server/tests/packed_checkpoints.py (transformers' own AWQ and GPTQ support needs GPU packages):

    python server/tests/packed_checkpoints.py awq ~/.cache/sluice/models/SmolLM2-135M-Instruct /tmp/awq
    python server/tests/packed_checkpoints.py dequantize /tmp/awq /tmp/awq-dequantized
    python benchmark/perplexity.py --serve /tmp/awq --model /tmp/awq-dequantized
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import shlex
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))

import machine
from run_all import BENCH, DEFAULT_MODEL, REPO, check_model, write_results
from servers import running, sluice_spec
from sluice_server.engine.kv_cache import KV_CACHE_DTYPES

DTYPES = ("float32", "bfloat16")
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# --quantize methods Sluice applies at load, to the projections of --model.
AT_LOAD_METHODS = ("fp8", "bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4")
REQUEST_TIMEOUT_S = 600.0


def log(message: str) -> None:
    print(f"[perplexity {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- windows ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    ids: list[int]
    text: str  # what is sent to the server: the ids decoded


def make_windows(tokenizer: Tokenizer, text: str, size: int) -> list[Window]:
    """The text's tokens in consecutive windows of `size` (the last one shorter), each with the
    text that tokenizes back to exactly its ids, as the router will tokenize it."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    windows = []
    for start in range(0, len(ids), size):
        chunk = ids[start : start + size]
        if len(chunk) < 2:
            break  # nothing to score: the first token of a window never is
        decoded = tokenizer.decode(chunk, skip_special_tokens=False)
        again = tokenizer.encode(decoded, add_special_tokens=True).ids
        if again != chunk:
            raise SystemExit(
                f"the window at token {start} does not tokenize back to its ids "
                f"({len(again)} ids instead of {len(chunk)}); pick another --window"
            )
        windows.append(Window(chunk, decoded))
    return windows


# --- the two sides ---------------------------------------------------------------------------


def post_json(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        return json.loads(response.read())


def sluice_logprobs(
    model_dir: Path,
    dtype: str,
    windows: list[Window],
    logs: Path,
    name: str,
    startup_timeout_s: float,
    quantize: str | None = None,
    kv_cache_dtype: str | None = None,
) -> tuple[list[list[float]], float]:
    """Each window's prompt logprobs (its first token left out) from the running server, and the
    server's startup time. The server logs to `logs`/NAME-sluice-DTYPE.log."""
    model = Path(DEFAULT_MODEL_ID) if quantize == "gguf" else model_dir
    spec = sluice_spec(model, dtype, logs / f"{name}-sluice-{dtype}.log", startup_timeout_s)
    if quantize is not None:
        spec = replace(spec, argv=[*spec.argv, "--quantize", quantize])
    if kv_cache_dtype is not None:
        spec = replace(spec, argv=[*spec.argv, "--kv-cache-dtype", kv_cache_dtype])
    log(f"starting Sluice in {dtype} (log: {spec.log})")
    scores = []
    with running(spec) as server:
        log(f"Sluice healthy after {server.startup_s:.0f} s")
        for index, window in enumerate(windows):
            body = {
                "inputs": window.text,
                "parameters": {"max_new_tokens": 1, "details": True, "decoder_input_details": True},
            }
            prefill = post_json(f"{spec.url}/generate", body)["details"]["prefill"]
            served = [token["id"] for token in prefill]
            if served != window.ids:
                mismatch = next(
                    (i for i, (a, b) in enumerate(zip(served, window.ids)) if a != b),
                    min(len(served), len(window.ids)),
                )
                raise SystemExit(
                    f"window {index}: the server tokenized it into {len(served)} ids, not the "
                    f"{len(window.ids)} of the window (first difference at position {mismatch})"
                )
            logprobs = [token["logprob"] for token in prefill[1:]]
            if prefill[0]["logprob"] is not None or any(lp is None for lp in logprobs):
                raise SystemExit(
                    f"window {index}: expected a logprob for every prompt token but the first"
                )
            scores.append(logprobs)
    return scores, server.startup_s


def transformers_logprobs(model_dir: Path, dtype: str, windows: list[Window]) -> list[list[float]]:
    import torch
    from transformers import AutoModelForCausalLM

    log(f"transformers in {dtype}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model.eval()
    scores = []
    with torch.inference_mode():
        for window in windows:
            ids = torch.tensor([window.ids])
            logits = model(ids).logits[0, :-1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            # Position p predicts token p + 1.
            scores.append(logprobs.gather(1, ids[0, 1:, None])[:, 0].tolist())
    return scores


def write_dequantized(model_dir: Path, method: str, out: Path) -> Path:
    """A copy of `model_dir` whose projections (the decoder layers' `*proj.weight`, those Sluice
    quantizes at load) are quantized with `method` and dequantized again."""
    import shutil

    from safetensors.torch import load_file, save_file
    from sluice_server.quant.at_load import QUANTIZERS

    quantize, multiple = QUANTIZERS[method]
    out.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        if path.suffix != ".safetensors" and path.is_file():
            shutil.copy2(path, out / path.name)
    for path in model_dir.glob("*.safetensors"):
        tensors = load_file(path)
        for name, tensor in tensors.items():
            if (
                ".layers." in name
                and name.endswith("proj.weight")
                and tensor.shape[1] % multiple == 0
            ):
                tensors[name] = quantize(tensor).dequantize(tensor.dtype)
        save_file(tensors, out / path.name, metadata={"format": "pt"})
    return out


# --- comparison ------------------------------------------------------------------------------


def perplexity(scores: list[list[float]]) -> float:
    flat = [lp for window in scores for lp in window]
    return math.exp(-sum(flat) / len(flat))


def compare(
    dtype: str, sluice: list[list[float]], reference: list[list[float]], startup_s: float
) -> dict[str, Any]:
    differences = [
        abs(a - b)
        for ours, theirs in zip(sluice, reference, strict=True)
        for a, b in zip(ours, theirs, strict=True)
    ]
    ours, theirs = perplexity(sluice), perplexity(reference)
    return {
        "dtype": dtype,
        "sluice": ours,
        "transformers": theirs,
        "relative_difference": ours / theirs - 1,
        "scored_tokens": len(differences),
        "mean_abs_logprob_difference": sum(differences) / len(differences),
        "max_abs_logprob_difference": max(differences),
        "sluice_startup_s": round(startup_s, 1),
    }


def package_version(name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a safetensors directory")
    p.add_argument("--text", type=Path, default=BENCH / "data" / "perplexity.txt")
    p.add_argument("--window", type=int, default=512, help="tokens per window")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.005,
        help="the largest relative difference between the two perplexities that passes",
    )
    p.add_argument(
        "--quantize",
        choices=["gguf", *AT_LOAD_METHODS],
        help="serve the default model quantized from its GGUF file, or quantized at load (see "
        "above)",
    )
    p.add_argument(
        "--dequantized",
        type=Path,
        default=Path.home() / ".cache" / "sluice" / "dequantized",
        help="where the copies transformers runs for --quantize's load-time methods are written",
    )
    p.add_argument(
        "--serve", type=Path, help="the directory Sluice serves, if not --model (see above)"
    )
    p.add_argument(
        "--kv-cache-dtype",
        choices=list(KV_CACHE_DTYPES),
        help="Sluice's KV cache in 8 bits (transformers keeps the model's dtype: the difference "
        "is what the cache costs)",
    )
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds per server start")
    p.add_argument("--results", type=Path, default=BENCH / "results" / "perplexity.json")
    a = p.parse_args()
    model_dir = a.model.expanduser().resolve()
    check_model(model_dir)
    served_dir = a.serve.expanduser().resolve() if a.serve else model_dir
    reference_dir = model_dir
    if a.quantize in AT_LOAD_METHODS:
        reference_dir = write_dequantized(model_dir, a.quantize, a.dequantized / a.quantize)
    if a.window < 2:
        p.error("--window must be at least 2: a window's first token is not scored")

    text = a.text.read_text()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    windows = make_windows(tokenizer, text, a.window)
    log(f"{sum(len(w.ids) for w in windows)} tokens in {len(windows)} windows of {a.window}")

    rows = []
    for dtype in a.dtypes:
        served, startup_s = sluice_logprobs(
            served_dir,
            dtype,
            windows,
            a.results.parent / "logs",
            a.results.stem,  # perplexity.json's logs: perplexity-sluice-DTYPE.log
            a.startup_timeout,
            a.quantize,
            a.kv_cache_dtype,
        )
        reference = transformers_logprobs(reference_dir, dtype, windows)
        row = compare(dtype, served, reference, startup_s)
        log(
            f"{dtype}: Sluice {row['sluice']:.4f}, transformers {row['transformers']:.4f} "
            f"({row['relative_difference']:+.3%})"
        )
        rows.append(row)

    passed = all(abs(row["relative_difference"]) <= a.tolerance for row in rows)
    results = {
        "generated_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmark/perplexity.py", *sys.argv[1:]]),
        "machine": asdict(machine.describe(0, 0, "float32")),
        "model": str(model_dir),
        "served": str(served_dir),
        "reference": str(reference_dir),
        "quantize": a.quantize,
        "kv_cache_dtype": a.kv_cache_dtype,
        "transformers": package_version("transformers"),
        "text": {
            "path": str(a.text.resolve().relative_to(REPO))
            if a.text.resolve().is_relative_to(REPO)
            else str(a.text),
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "tokens": sum(len(w.ids) for w in windows),
        },
        "window": a.window,
        "windows": len(windows),
        "tolerance": a.tolerance,
        "passed": passed,
        "dtypes": rows,
    }
    write_results(a.results, results)
    log(f"wrote {a.results}")
    print(json.dumps(results))
    if not passed:
        raise SystemExit(
            f"Sluice's perplexity differs from transformers' by more than {a.tolerance:.1%}"
        )


if __name__ == "__main__":
    main()
