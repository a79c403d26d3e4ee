"""Where a decode step's time goes, measured in the shard's engine without gRPC or the router.

Admits `--batch` requests of `--prompt-tokens` tokens, then runs `--steps` decode steps through
`StepExecutor.step` (the code the gRPC service calls) and reports the step time split into the
model forward and the rest (request bookkeeping, batch building, sampling), then the top
operators from torch.profiler.

    python benchmark/profile_step.py --model ~/.cache/sluice/models/SmolLM2-135M-Instruct \
        --dtype bfloat16 --batch 32

With `--gguf-file FILE` (the file --model was converted from), the file's quantized projections,
as `--quantize gguf` serves them; with `--quantize METHOD`, the launcher's other methods.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from sluice_server.engine.step import StepExecutor
from sluice_server.kernels import select_kernels
from sluice_server.models.loader import load_model
from sluice_server.pb import generate_pb2 as pb

BLOCK_SIZE = 16


def admission_step(batch: int, prompt_tokens: int, max_new: int) -> pb.StepRequest:
    """A step that admits `batch` prompts of `prompt_tokens` tokens, each with blocks for
    `max_new` more."""
    blocks_each = -(-(prompt_tokens + max_new) // BLOCK_SIZE)
    step = pb.StepRequest()
    for i in range(batch):
        step.new_requests.append(
            pb.NewRequest(
                id=i,
                token_ids=[(i * 7 + t) % 1000 + 10 for t in range(prompt_tokens)],
                sampling=pb.SamplingParameters(),
            )
        )
        step.scheduled.append(
            pb.ScheduledRequest(
                id=i,
                num_tokens=prompt_tokens,
                new_blocks=range(i * blocks_each, (i + 1) * blocks_each),
            )
        )
    return step


def decode_step(batch: int) -> pb.StepRequest:
    return pb.StepRequest(scheduled=[pb.ScheduledRequest(id=i, num_tokens=1) for i in range(batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--kernels", choices=["auto", "compiled", "reference"], default="auto")
    parser.add_argument("--trace", type=Path, help="write a Chrome trace here")
    parser.add_argument("--gguf-file", type=Path, help="serve this GGUF file's quantized weights")
    parser.add_argument("--quantize", help="as the launcher's --quantize (not gguf)")
    args = parser.parse_args()

    device = torch.device("cpu")
    kernels = select_kernels(args.kernels, device, Path.home() / ".cache" / "sluice" / "kernels")
    loaded = load_model(
        args.model.expanduser(),
        getattr(torch, args.dtype),
        device,
        kernels,
        gguf_file=args.gguf_file,
        quantize=args.quantize,
    )
    executor = StepExecutor(loaded, BLOCK_SIZE, None)
    max_new = 2 * args.steps + 8
    blocks_each = -(-(args.prompt_tokens + max_new) // BLOCK_SIZE)
    executor.warmup(args.prompt_tokens, args.batch, args.prompt_tokens + max_new)
    if executor.num_blocks < args.batch * blocks_each:
        raise SystemExit("the KV cache is too small for this batch")
    executor.step(admission_step(args.batch, args.prompt_tokens, max_new))

    for _ in range(5):
        executor.step(decode_step(args.batch))
    totals, forwards = [], []
    for _ in range(args.steps):
        start = time.perf_counter_ns()
        response = executor.step(decode_step(args.batch))
        totals.append(time.perf_counter_ns() - start)
        forwards.append(response.forward_ns)
    total_ms = statistics.median(totals) / 1e6
    forward_ms = statistics.median(forwards) / 1e6
    print(
        json.dumps(
            {
                "batch": args.batch,
                "dtype": args.dtype,
                "kernels": type(kernels.attention).__name__,
                "threads": torch.get_num_threads(),
                "step_ms": round(total_ms, 2),
                "forward_ms": round(forward_ms, 2),
                "outside_forward_ms": round(total_ms - forward_ms, 2),
                "tokens_per_s_engine": round(args.batch / (total_ms / 1e3), 1),
            }
        )
    )

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(10):
            executor.step(decode_step(args.batch))
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    if args.trace:
        profiler.export_chrome_trace(str(args.trace))


if __name__ == "__main__":
    main()
