"""Where a decode step's time goes, measured in the shard's engine without gRPC or the router.

Admits `--batch` requests of `--prompt-tokens` tokens, then runs `--steps` decode steps through
`StepExecutor.step` (the code the gRPC service calls) and reports the step time split into the
model forward and the rest (request bookkeeping, batch building, sampling), then the top
operators from torch.profiler.

    python benchmark/profile_step.py --model ~/.cache/sluice/models/SmolLM2-135M-Instruct \
        --dtype bfloat16 --batch 32

With `--gguf-file FILE` (the file --model was converted from), the file's quantized projections,
as `--quantize gguf` serves them; with `--quantize METHOD`, the launcher's other methods.

Where the model's layers run as one compiled call (see sluice_server.models.compiled_stack),
`--layer-by-layer` runs them through the Python layers instead, to measure the difference.

With `--kernel-times`, a second JSON line: each kernel entry point's milliseconds per step
(the ops' and the attention backend's methods, each call timed), and the rest of the step, which
is Python between the kernels and the step's bookkeeping. The kernels are timed from Python, so
the layers run layer by layer:

    python benchmark/profile_step.py --model DIR --batch 1 --kernel-times

With `--breakdown`, a JSON line that splits the forward of a decode step into the decoder layers'
projections alone (every layer's four weights multiplied in model order, as a step streams
them), the LM head alone, and the rest (attention, norms, the embedding, the calls between):
each part timed by itself, taking turns with whole steps in this process, so that a drifting
machine moves all of them alike. Each projection is one call of its layer's `forward` from
Python, a few microseconds each, which counts towards the projections.

    python benchmark/profile_step.py --model DIR --batch 1 --breakdown

With `--prefill N [N ...]`, instead of decode steps: steps that each admit one prompt of N
tokens whole (no other request running), `--rounds` of each length (3), their median time and
prompt tokens per second; with `--kernel-times`, each kernel entry point's milliseconds in the
last of them. With `--against REV`, decode or prompt steps, the same steps with the kernel
source at that git revision too (a second model and KV cache), the two taking turns step by
step and, for decode steps, going first in turn (the revision's kernels must take the present
Python code's arguments: the KV cache's scales since c523bee):

    python benchmark/profile_step.py --model DIR --prefill 512 1024 2048 --kernel-times
    python benchmark/profile_step.py --model DIR --prefill 2048 4096 --rounds 6 --against HEAD~1
    python benchmark/profile_step.py --model DIR --batch 32 --steps 60 --against HEAD

With `--slow-steps` beside `--prefill`, a line for every step that took a fifth longer than the
median: the longest time one of this process's threads waited in a run queue during it, and
the other processes that ran the most meanwhile. A step waits for its slowest thread, so a
thread that another process keeps off its core for 15 ms delays the step by about as much:

    python benchmark/profile_step.py --model DIR --prefill 128 --rounds 400 --slow-steps

With `--kv-cache-dtype D [D ...]`, the steps on a KV cache of each dtype (`model`: the model's;
`fp8_e4m3fn`, `fp8_e5m2`: the launcher's 8-bit caches), one cache each on the same model, taking
turns step by step as with `--against`; the first is the one reported in full:

    python benchmark/profile_step.py --model DIR --batch 32 --steps 60 \
        --kv-cache-dtype fp8_e4m3fn model

With `--neighbour-load F`, a process pinned to the last CPU is busy for the fraction F of the
time while the steps run (benchmark/neighbour.py), as the router or another tenant would be.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from neighbour import busy_neighbour
from quantized_kernel import kernels_at_revision
from servers import interruptions, thread_times
from sluice_server.engine.kv_cache import KV_CACHE_DTYPES
from sluice_server.engine.step import StepExecutor
from sluice_server.kernels import CpuFeatures, Kernels, select_kernels
from sluice_server.layers.attention import CompiledCpuAttentionBackend
from sluice_server.layers.linear import Linear
from sluice_server.layers.ops import CompiledCpuOps
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


# The kernel entry points --kernel-times times, where the kernels' classes have them.
OPS_METHODS = (
    "packed_linear",
    "quantized_linear",
    "rms_norm",
    "add_rms_norm",
    "rotary_",
    "silu_and_mul",
    "gelu_tanh_and_mul",
    "argmax_logprob",
    "top_k_top_p_",
    "typical_p_",
    "draw",
)
ATTENTION_METHODS = ("build_metadata", "write", "attend")


def projection_inputs(model: torch.nn.Module, batch: int) -> list[tuple[Linear, torch.Tensor]]:
    """Every decoder layer's projections in the order a step multiplies them, each with a `batch`
    -row input of its width."""
    calls = []
    for layer in model.layers:
        attention, mlp = layer.self_attn, layer.feed_forward
        hidden = layer.input_layernorm.weight.numel()
        widths = (
            (attention.qkv_proj, hidden),
            (attention.o_proj, attention.num_heads * attention.config.head_dim),
            (mlp.gate_up_proj, hidden),
            (mlp.down_proj, output_features(mlp.gate_up_proj) // 2),
        )
        for linear, width in widths:
            calls.append((linear, torch.randn(batch, width, dtype=model.lm_head.weight.dtype)))
    return calls


def output_features(linear: Linear) -> int:
    if linear.quantized is not None:
        return linear.quantized.out_features
    if linear.packed is not None:
        return linear.packed.out_features
    return linear.weight.shape[0]


def breakdown(executor: StepExecutor, model: torch.nn.Module, batch: int, rounds: int) -> dict:
    """Milliseconds per decode step: the forward, the layers' projections, the LM head, and the
    forward's rest; medians over `rounds` turns of 5 steps and 3 passes of each part."""
    layers = projection_inputs(model, batch)
    head_input = torch.randn(batch, model.norm.weight.numel(), dtype=model.lm_head.weight.dtype)
    forwards, projections, heads = [], [], []
    with torch.inference_mode():
        for _ in range(rounds):
            for _ in range(5):
                forwards.append(executor.step(decode_step(batch)).forward_ns / 1e6)
            for _ in range(3):
                start = time.perf_counter_ns()
                for linear, x in layers:
                    linear.forward(x)
                projections.append((time.perf_counter_ns() - start) / 1e6)
                start = time.perf_counter_ns()
                model.lm_head.forward(head_input)
                heads.append((time.perf_counter_ns() - start) / 1e6)
    forward, projection, head = (statistics.median(v) for v in (forwards, projections, heads))
    return {
        "forward_ms": round(forward, 2),
        "layer_projections_ms": round(projection, 2),
        "lm_head_ms": round(head, 2),
        "rest_ms": round(forward - projection - head, 2),
    }


class KernelTimer:
    """Times each kernel entry point of `kernels` while `on`. Installed before the model is
    built, since layers keep bound methods of the ops (off, each call costs a Python call)."""

    def __init__(self, kernels: object) -> None:
        self.on = False
        self.spent: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        for instance, names in ((kernels.ops, OPS_METHODS), (kernels.attention, ATTENTION_METHODS)):
            for name in names:
                if hasattr(type(instance), name):
                    self._wrap(type(instance), name)

    def _wrap(self, cls: type, name: str) -> None:
        original = getattr(cls, name)

        def call(instance: object, *args: object, **kwargs: object) -> object:
            if not self.on:
                return original(instance, *args, **kwargs)
            start = time.perf_counter_ns()
            try:
                return original(instance, *args, **kwargs)
            finally:
                self.spent[name] += time.perf_counter_ns() - start
                self.calls[name] += 1

        setattr(cls, name, call)

    def measure(self, executor: StepExecutor, batch: int, steps: int) -> dict:
        """Milliseconds per decode step in each entry point, and in the rest of the step."""
        self.on = True
        start = time.perf_counter_ns()
        for _ in range(steps):
            executor.step(decode_step(batch))
        step_ns = (time.perf_counter_ns() - start) / steps
        self.on = False
        per_step = {name: round(ns / steps / 1e6, 3) for name, ns in self.spent.most_common()}
        return {
            "step_ms": round(step_ns / 1e6, 2),
            "kernel_ms_per_step": per_step,
            "calls_per_step": {name: self.calls[name] // steps for name in per_step},
            "outside_kernels_ms": round((step_ns - sum(self.spent.values()) / steps) / 1e6, 2),
        }


def prefill(
    executors: dict[str, StepExecutor],
    lengths: list[int],
    timer: KernelTimer | None,
    rounds: int,
    watch_slow: bool = False,
) -> None:
    """Prints, per prompt length, the median of `rounds` steps that each admit one prompt of that
    many tokens (freed after each), and with `timer` the kernels' milliseconds in the last one.
    With more than one executor (the kernels of other revisions), they take turns step by step,
    so that a drifting machine moves all of them alike; the first is `step_ms`. With
    `watch_slow`, a line for each of the first executor's steps that took a fifth longer than
    its median: what kept this process's threads waiting for a CPU during it."""
    first = next(iter(executors))
    for length in lengths:
        times: dict[str, list[float]] = {label: [] for label in executors}
        seen: list[dict] = []  # the first executor's interruptions, step by step
        for round_number in range(rounds):
            for label, executor in executors.items():
                timed = timer is not None and label == first and round_number == rounds - 1
                watched = watch_slow and label == first
                if timer is not None:
                    timer.spent.clear()
                    timer.calls.clear()
                    timer.on = timed
                before = thread_times() if watched else {}
                start = time.perf_counter_ns()
                executor.step(admission_step(1, length, 1))
                times[label].append((time.perf_counter_ns() - start) / 1e6)
                if watched:
                    seen.append(interruptions(before, thread_times(), os.getpid()))
                if timer is not None:
                    timer.on = False
                executor.step(pb.StepRequest(free_ids=[0]))
        medians = {label: statistics.median(spent) for label, spent in times.items()}
        for round_number, seen_then in enumerate(seen):
            step_ms = times[first][round_number]
            if step_ms > 1.2 * medians[first]:
                slow = {"prefill_tokens": length, "round": round_number}
                slow |= {"step_ms": round(step_ms, 1), "median_ms": round(medians[first], 1)}
                print(json.dumps(slow | seen_then))
        step_ms = medians[first]
        result = {
            "prefill_tokens": length,
            "step_ms": round(step_ms, 1),
            "prompt_tokens_per_s": round(length / step_ms * 1e3),
        }
        if len(executors) > 1:
            result["step_ms_each"] = {label: round(ms, 1) for label, ms in medians.items()}
            result["rounds_ms"] = {
                label: [round(t) for t in spent] for label, spent in times.items()
            }
        if timer is not None:
            result["kernel_ms"] = {
                name: round(ns / 1e6, 1) for name, ns in timer.spent.most_common()
            }
        print(json.dumps(result), flush=True)


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
    parser.add_argument(
        "--kernel-times", action="store_true", help="also time each kernel entry point"
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also split the forward into the layers' projections, the LM head and the rest",
    )
    parser.add_argument(
        "--neighbour-load",
        type=float,
        default=0.0,
        help="fraction of the last CPU a busy neighbour process takes during the steps",
    )
    parser.add_argument(
        "--prefill",
        type=int,
        nargs="+",
        help="time steps admitting one prompt of each of these lengths instead of decode steps",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="steps of each prompt length with --prefill"
    )
    parser.add_argument(
        "--against",
        help="also run the steps with the kernel source at this git revision, "
        "taking turns with the current kernels",
    )
    parser.add_argument(
        "--slow-steps",
        action="store_true",
        help="with --prefill: for each step a fifth slower than the median, what kept this "
        "process's threads waiting for a CPU during it",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        nargs="+",
        choices=["model", *KV_CACHE_DTYPES],
        default=["model"],
        help="the KV cache's dtype; with several, a cache of each, taking turns",
    )
    parser.add_argument(
        "--layer-by-layer",
        action="store_true",
        help="run the Python layers, not the compiled stack",
    )
    args = parser.parse_args()
    if args.slow_steps and not args.prefill:
        parser.error("--slow-steps times prompt steps: give --prefill too")

    device = torch.device("cpu")
    kernels = select_kernels(args.kernels, device, Path.home() / ".cache" / "sluice" / "kernels")
    timer = KernelTimer(kernels) if args.kernel_times else None
    loaded = load_model(
        args.model.expanduser(),
        getattr(torch, args.dtype),
        device,
        kernels,
        gguf_file=args.gguf_file,
        quantize=args.quantize,
    )
    if args.layer_by_layer or args.kernel_times:
        loaded.model.compiled_stack = None
    executors = {
        f"{name} cache" if len(args.kv_cache_dtype) > 1 else "current": StepExecutor(
            loaded, BLOCK_SIZE, None, None, KV_CACHE_DTYPES.get(name)
        )
        for name in args.kv_cache_dtype
    }
    executor = next(iter(executors.values()))
    with tempfile.TemporaryDirectory() as work:
        if args.against:
            module = kernels_at_revision(args.against, Path(work))
            baseline = Kernels(
                CompiledCpuAttentionBackend(module),
                CompiledCpuOps(module, CpuFeatures.detect()),
            )
            model = load_model(
                args.model.expanduser(), getattr(torch, args.dtype), device, baseline
            )
            if loaded.model.compiled_stack is None:
                model.model.compiled_stack = None
            executors[args.against] = StepExecutor(model, BLOCK_SIZE, None)
        if args.prefill:
            longest = max(args.prefill)
            for each in executors.values():
                each.warmup(longest, 1, longest + 1)
            prefill(executors, args.prefill, timer, args.rounds, args.slow_steps)
            return
        # Tokens each request decodes: 5 warm-up steps, the timed steps (twice with
        # --kernel-times), the breakdown's steps, 10 profiled steps, and a margin.
        breakdown_steps = 5 * args.steps if args.breakdown else 0
        max_new = (3 if args.kernel_times else 2) * args.steps + breakdown_steps + 16
        for each in executors.values():
            admit_batch(each, args.batch, args.prompt_tokens, max_new)
        compiled = loaded.model.compiled_stack is not None
        with busy_neighbour(args.neighbour_load):
            described = {
                "batch": args.batch,
                "dtype": args.dtype,
                "kernels": type(kernels.attention).__name__,
                "kv_cache_dtype": str(executor.cache_spec.dtype),
                "layers": "compiled" if compiled else "layer by layer",
                "threads": torch.get_num_threads(),
            }
            print(json.dumps(described | decode(executors, args.batch, args.steps)), flush=True)
            if timer is not None:
                print(json.dumps(timer.measure(executor, args.batch, args.steps)), flush=True)
            if args.breakdown:
                result = breakdown(executor, loaded.model, args.batch, args.steps)
                print(json.dumps(result), flush=True)
            profile(executor, args.batch, args.trace)


def admit_batch(executor: StepExecutor, batch: int, prompt_tokens: int, max_new: int) -> None:
    """Warms the executor up and admits `batch` prompts, each with room for `max_new` tokens."""
    executor.warmup(prompt_tokens, batch, prompt_tokens + max_new)
    if executor.num_blocks < batch * -(-(prompt_tokens + max_new) // BLOCK_SIZE):
        raise SystemExit("the KV cache is too small for this batch")
    executor.step(admission_step(batch, prompt_tokens, max_new))


def decode(executors: dict[str, StepExecutor], batch: int, steps: int) -> dict:
    """The median decode step of the first executor, split into the forward and the rest,
    after 5 warm-up steps of each. With more than one (the kernels of other revisions), they take
    turns step by step, so that a drifting machine moves all of them alike, with `step_ms_each`."""
    for executor in executors.values():
        for _ in range(5):
            executor.step(decode_step(batch))
    totals: dict[str, list[int]] = {label: [] for label in executors}
    forwards: dict[str, list[int]] = {label: [] for label in executors}
    turns = list(executors.items())
    for step in range(steps):
        # Which goes first alternates: the step after another's finds the caches in its state.
        for label, executor in turns if step % 2 == 0 else reversed(turns):
            start = time.perf_counter_ns()
            response = executor.step(decode_step(batch))
            totals[label].append(time.perf_counter_ns() - start)
            forwards[label].append(response.forward_ns)
    first = turns[0][0]
    total_ms = statistics.median(totals[first]) / 1e6
    forward_ms = statistics.median(forwards[first]) / 1e6
    result = {
        "step_ms": round(total_ms, 2),
        "forward_ms": round(forward_ms, 2),
        "outside_forward_ms": round(total_ms - forward_ms, 2),
        "tokens_per_s_engine": round(batch / (total_ms / 1e3), 1),
    }
    if len(executors) > 1:
        result["step_ms_each"] = {
            label: round(statistics.median(spent) / 1e6, 2) for label, spent in totals.items()
        }
    return result


def profile(executor: StepExecutor, batch: int, trace: Path | None) -> None:
    """The top operators of 10 decode steps, from torch.profiler; their Chrome trace to `trace`."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(10):
            executor.step(decode_step(batch))
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    if trace:
        profiler.export_chrome_trace(str(trace))


if __name__ == "__main__":
    main()
