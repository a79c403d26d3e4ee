"""End-to-end check of Sluice through the real launcher, router and shard, on the GPU when there
is one (on CPU otherwise, for trying the script out). scripts/gpu_check.sh runs it; see
docs/gpu.md.

1. Builds a random bfloat16 Llama with SmolLM2-135M's shape from `--model-src` (config.json and
   tokenizer files; the real weights are too large to carry to the GPU machine), its weights
   drawn wider than SmolLM2's initialisation so that its greedy choices are clear.
2. Serves it in float32 and checks: /info names the device; /generate's greedy token ids equal
   transformers' `generate` on the same device; 32 concurrent requests each get the tokens they
   get alone; /generate_stream streams the same tokens; the launcher stops cleanly on SIGTERM.
3. Serves it in the shard's default dtype (bfloat16 on a GPU) and measures output tokens/s with
   benchmark/load.py at each concurrency level.
4. With `--quantize awq fp8`: serves it quantized, in the default dtype, with each method (awq:
   an AWQ checkpoint written from it by server/tests/packed_checkpoints.py, groups of 64; fp8:
   quantized at load), checks that concurrent requests get the tokens they get alone and
   measures output tokens/s as in 3.

Writes every result to `--results` as JSON and exits non-zero if a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
import torch
import transformers
from tokenizers import Tokenizer

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
STARTUP_TIMEOUT_S = 300
GREEDY_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a village by the sea,",
]
GREEDY_TOKENS = 32
CONCURRENT_REQUESTS = 32
CONCURRENT_TOKENS = 16


def log(message: str) -> None:
    print(f"[gpu_e2e {time.strftime('%H:%M:%S')}] {message}", flush=True)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_model(source: Path, destination: Path) -> None:
    """Random weights in SmolLM2-135M's shape (fixed seed), saved in bfloat16 with the tokenizer."""
    config = transformers.AutoConfig.from_pretrained(source)
    # SmolLM2's 0.02 leaves the residual stream to the embeddings: the model repeats one or two
    # tokens, with greedy choices 1e-4 apart. At 0.1 each prompt above gets 32 different tokens,
    # its closest choices at least 5e-4 apart (H200; 0.05 on CPU, whose random draws differ),
    # far above the 1e-5 by which float32 logits differ between implementations.
    config.initializer_range = 0.1
    torch.manual_seed(0)
    with device():  # Initialising 135M parameters on the GPU takes a fraction of the CPU's time.
        model = transformers.LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(destination)
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, destination / name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(model_dir: Path, work: Path, name: str, flags: list[str]) -> Iterator[str]:
    """Runs sluice-launcher until the block ends; yields its URL. The launcher must exit 0 on
    SIGTERM."""
    port = free_port()
    log_path = work / f"launcher-{name}.log"
    argv = [
        "sluice-launcher",
        "--model-id", str(model_dir),
        "--hostname", "127.0.0.1",
        "--port", str(port),
        "--shard-uds-path", str(work / f"shard-{name}"),
        "--max-input-tokens", "256",
        "--max-total-tokens", "512",
        *flags,
    ]  # fmt: skip
    log(f"starting {' '.join(argv)}")
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            argv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(process, url, log_path)
        yield url
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            code = process.wait()
    if code != 0:
        raise RuntimeError(f"launcher exited with {code} on SIGTERM; see {log_path}")


def wait_until_healthy(process: subprocess.Popen, url: str, log_path: Path) -> None:
    started = time.monotonic()
    while time.monotonic() - started < STARTUP_TIMEOUT_S:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"launcher exited with {process.returncode}:\n{tail}")
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                log(f"healthy after {time.monotonic() - started:.1f}s")
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"not healthy after {STARTUP_TIMEOUT_S}s; see {log_path}")


def generate(url: str, prompt: str, max_new_tokens: int) -> list[int]:
    """Greedy token ids from /generate, EOS ignored."""
    parameters = {"max_new_tokens": max_new_tokens, "details": True, "ignore_eos": True}
    response = requests.post(
        f"{url}/generate", json={"inputs": prompt, "parameters": parameters}, timeout=300
    )
    response.raise_for_status()
    return [token["id"] for token in response.json()["details"]["tokens"]]


def stream(url: str, prompt: str, max_new_tokens: int) -> tuple[list[int], dict[str, Any]]:
    """Token ids from /generate_stream's events, and the last event."""
    parameters = {"max_new_tokens": max_new_tokens, "ignore_eos": True}
    body = {"inputs": prompt, "parameters": parameters}
    token_ids: list[int] = []
    last: dict[str, Any] = {}
    with requests.post(f"{url}/generate_stream", json=body, stream=True, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("data:"):
                last = json.loads(line.removeprefix("data:"))
                token_ids.append(last["token"]["id"])
    return token_ids, last


def reference_greedy(
    model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int
) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens (EOS ignored) and each step's lead over the runner-up."""
    with torch.no_grad():
        output = model.generate(
            torch.tensor([prompt_ids], device=device()),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    top_two = torch.cat(output.logits).float().topk(2, dim=-1).values
    margins = (top_two[:, 0] - top_two[:, 1]).tolist()
    return output.sequences[0, len(prompt_ids) :].tolist(), margins


def check_info(url: str, dtype: str) -> dict[str, Any]:
    info = requests.get(f"{url}/info", timeout=30).json()
    passed = info["model_device_type"].startswith(device().type) and info["model_dtype"] == dtype
    return {"pass": passed, "info": info}


def check_greedy(url: str, model_dir: Path) -> dict[str, Any]:
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = model.to(device()).eval()
    results = []
    for prompt in GREEDY_PROMPTS:
        # The router encodes with the tokenizer's special tokens, as this does.
        prompt_ids = tokenizer.encode(prompt).ids
        expected, margins = reference_greedy(model, prompt_ids, GREEDY_TOKENS)
        actual = generate(url, prompt, GREEDY_TOKENS)
        first_difference = next(
            (i for i, (a, e) in enumerate(zip(actual, expected)) if a != e), None
        )
        results.append(
            {
                "prompt": prompt,
                "sluice": actual,
                "transformers": expected,
                "first_difference": first_difference,
                "smallest_margin": min(margins),
                "pass": actual == expected,
            }
        )
    return {"pass": all(result["pass"] for result in results), "prompts": results}


def concurrent_prompts() -> list[str]:
    words = ["river", "stone", "light", "market", "garden", "winter", "music", "paper", "window"]
    return [
        " ".join(words[(i + j * 7) % len(words)] for j in range(4 + i % 9)) + f" {i}"
        for i in range(CONCURRENT_REQUESTS)
    ]


def check_concurrent(url: str) -> dict[str, Any]:
    """All requests at once first (fresh prompts, batched), then each alone (from the prefix
    cache the first round filled)."""
    prompts = concurrent_prompts()
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        together = list(pool.map(lambda p: generate(url, p, CONCURRENT_TOKENS), prompts))
    alone = [generate(url, prompt, CONCURRENT_TOKENS) for prompt in prompts]
    mismatched = [i for i, (a, b) in enumerate(zip(together, alone)) if a != b]
    return {"pass": not mismatched, "requests": len(prompts), "mismatched": mismatched}


def check_stream(url: str) -> dict[str, Any]:
    prompt = GREEDY_PROMPTS[0]
    token_ids, last = stream(url, prompt, CONCURRENT_TOKENS)
    expected = generate(url, prompt, CONCURRENT_TOKENS)
    details = last.get("details") or {}
    passed = (
        token_ids == expected
        and last.get("generated_text") is not None
        and details.get("generated_tokens") == CONCURRENT_TOKENS
    )
    return {"pass": passed, "stream": token_ids, "generate": expected, "last_event": last}


def scrape_metrics(url: str) -> dict[str, float]:
    """/metrics samples summed over label sets."""
    samples: dict[str, float] = {}
    for line in requests.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            samples[name] = samples.get(name, 0.0) + float(value)
    return samples


def mean_ms(before: dict[str, float], after: dict[str, float], histogram: str) -> float | None:
    count = after.get(f"{histogram}_count", 0.0) - before.get(f"{histogram}_count", 0.0)
    total = after.get(f"{histogram}_sum", 0.0) - before.get(f"{histogram}_sum", 0.0)
    return 1000 * total / count if count else None


def bench(url: str, model_dir: Path, work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """benchmark/load.py, one level at a time with its own prompts (no prefix-cache hits from an
    earlier level), plus the shard's mean step time over each level from /metrics."""
    levels = []
    for index, concurrency in enumerate(args.concurrency):
        out = work / f"load-{concurrency}.json"
        before = scrape_metrics(url)
        subprocess.run(
            [
                sys.executable, str(REPO / "benchmark" / "load.py"),
                "--url", url, "--route", "generate_stream", "--tokenizer", str(model_dir),
                "--concurrency", str(concurrency),
                "--prompt-tokens", str(args.prompt_tokens),
                "--output-tokens", str(args.output_tokens),
                "--ignore-eos", "--seed", str(index), "--warmup", "2" if index == 0 else "0",
                "--out", str(out),
            ],
            check=True,
        )  # fmt: skip
        after = scrape_metrics(url)
        (level,) = json.loads(out.read_text())
        level["shard_step_mean_ms"] = mean_ms(before, after, "sluice_shard_step_duration")
        level["shard_forward_mean_ms"] = mean_ms(before, after, "sluice_shard_forward_duration")
        levels.append(level)
    return levels


def environment() -> dict[str, Any]:
    found = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device()),
    }
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name()
        found["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return found


def timed(timings: dict[str, float], name: str, work: Callable[[], Any]) -> Any:
    started = time.monotonic()
    log(f"{name} ...")
    try:
        return work()
    finally:
        timings[name] = round(time.monotonic() - started, 1)
        log(f"{name}: {timings[name]}s")


def run_checks(args: argparse.Namespace, results: dict[str, Any]) -> None:
    model_dir = args.work / "model"
    timings, checks = results["timings_s"], results["checks"]
    timed(timings, "make_model", lambda: make_model(args.model_src, model_dir))
    with serve(model_dir, args.work, "float32", ["--dtype", "float32"]) as url:
        checks["info_float32"] = timed(timings, "info", lambda: check_info(url, "float32"))
        checks["greedy_vs_transformers"] = timed(
            timings, "greedy", lambda: check_greedy(url, model_dir)
        )
        checks["concurrent"] = timed(timings, "concurrent", lambda: check_concurrent(url))
        checks["stream"] = timed(timings, "stream", lambda: check_stream(url))
    checks["clean_stop"] = {"pass": True}
    if args.concurrency:
        with serve(model_dir, args.work, "default-dtype", []) as url:
            dtype = requests.get(f"{url}/info", timeout=30).json()["model_dtype"]
            results["bench_dtype"] = dtype
            if device().type == "cuda":
                checks["gpu_default_dtype"] = {"pass": dtype == "bfloat16", "dtype": dtype}
            results["bench"] = timed(
                timings, "bench", lambda: bench(url, model_dir, args.work, args)
            )
    for method in args.quantize:
        timed(timings, f"quantized_{method}", lambda m=method: check_quantized(m, args, results))


def check_quantized(method: str, args: argparse.Namespace, results: dict[str, Any]) -> None:
    model_dir = args.work / "model"
    if method == "awq":
        sys.path.insert(0, str(REPO / "server" / "tests"))
        from packed_checkpoints import quantize_checkpoint

        quantized_dir = args.work / "model-awq"
        quantize_checkpoint(model_dir, quantized_dir, "awq", bits=4, group_size=64)
        model_dir = quantized_dir
    with serve(model_dir, args.work, f"quantized-{method}", ["--quantize", method]) as url:
        results["checks"][f"concurrent_{method}"] = check_concurrent(url)
        if args.concurrency:
            results[f"bench_{method}"] = bench(url, model_dir, args.work, args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-src", type=Path, required=True, help="config.json + tokenizer")
    parser.add_argument("--work", type=Path, required=True, help="model, logs, load results")
    parser.add_argument("--results", type=Path, required=True, help="the JSON written")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument(
        "--quantize", nargs="*", default=[], choices=["awq", "fp8"], help="methods to serve"
    )
    args = parser.parse_args()
    # `timeout` stops this script with SIGTERM: exit through the `serve` blocks, which stop the
    # launchers (they run in sessions of their own and would outlive this process).
    signal.signal(signal.SIGTERM, lambda _signal, _frame: sys.exit(128 + signal.SIGTERM))
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"environment": environment(), "checks": {}, "timings_s": {}}
    checks = results["checks"]
    try:
        run_checks(args, results)
    # Recorded with the results, so that a partial run still says why it stopped.
    except (RuntimeError, OSError, ValueError, KeyError, subprocess.SubprocessError) as error:
        checks["error"] = {"pass": False, "error": f"{type(error).__name__}: {error}"}
        log(f"error: {error}")
    finally:
        args.results.write_text(json.dumps(results, indent=2))
    failed = [name for name, check in checks.items() if not check["pass"]]
    log(f"checks failed: {failed}" if failed else f"all {len(checks)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
