"""The naive baseline: transformers `generate` on the same model and prompts as the servers.

Greedy, EOS ignored (min_new_tokens = max_new_tokens), bfloat16 on CPU, (a) one request at a
time and (b) static batches (left padding, the whole batch waits for its longest member). The
prompts come from load.py's `make_prompts`, so a batch of B uses the prompts the servers got at
concurrency B (seed = --seed + B, as run_all.py does). Prints one JSON object.

    python benchmark/baseline_transformers.py --model ~/.cache/sluice/models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import make_prompts


@dataclass
class ModeResult:
    mode: str  # "sequential" or "static_batch"
    batch: int
    requests: int
    output_tokens: int
    duration_s: float
    output_tokens_per_s: float


@dataclass
class Baseline:
    model: str
    dtype: str
    threads: int
    prompt_tokens: int
    new_tokens: int
    modes: list[ModeResult]


def generate(
    model: AutoModelForCausalLM, tokenizer: AutoTokenizer, prompts: list[str], new_tokens: int
) -> int:
    """Runs one `generate` over `prompts` and returns the number of new tokens produced."""
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        output = model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    return int((output.shape[1] - inputs["input_ids"].shape[1]) * output.shape[0])


def timed(
    mode: str,
    batch: int,
    runs: list[list[str]],
    model: AutoModelForCausalLM,
    tokenizer: AutoTokenizer,
    new_tokens: int,
) -> ModeResult:
    start = time.perf_counter()
    tokens = sum(generate(model, tokenizer, prompts, new_tokens) for prompts in runs)
    duration = time.perf_counter() - start
    return ModeResult(
        mode,
        batch,
        sum(len(p) for p in runs),
        tokens,
        round(duration, 3),
        round(tokens / duration, 2),
    )


def load(model_dir: Path, dtype: torch.dtype) -> tuple[AutoModelForCausalLM, AutoTokenizer]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"  # decoder-only: new tokens must follow the prompt directly
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    return model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--sequential", type=int, default=4, help="requests one at a time")
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[8, 32])
    parser.add_argument("--batches", type=int, default=1, help="batches per batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    model_dir = args.model.expanduser()
    model, tokenizer = load(model_dir, getattr(torch, args.dtype))
    fast = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    # One untimed request so that the first timed one does not pay for kernel selection.
    generate(model, tokenizer, make_prompts(fast, 1, args.prompt_tokens, args.seed + 10_000), 4)

    modes = []
    if args.sequential > 0:
        prompts = make_prompts(fast, args.sequential, args.prompt_tokens, args.seed + 1)
        modes.append(
            timed("sequential", 1, [[p] for p in prompts], model, tokenizer, args.new_tokens)
        )
    for batch in args.batch_sizes:
        prompts = make_prompts(fast, batch * args.batches, args.prompt_tokens, args.seed + batch)
        runs = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
        modes.append(timed("static_batch", batch, runs, model, tokenizer, args.new_tokens))

    result = Baseline(
        str(model_dir),
        args.dtype,
        torch.get_num_threads(),
        args.prompt_tokens,
        args.new_tokens,
        modes,
    )
    text = json.dumps(asdict(result))
    print(text, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
