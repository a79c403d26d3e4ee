"""Sluice's bfloat16 matmul (`linear_bf16` in the compiled CPU kernels) against oneDNN's, which
PyTorch runs for a prepacked `mkldnn::_linear_pointwise`, on the projections of a model. oneDNN
runs in bfloat16 where it has bfloat16 on this CPU, else in float32 (the dtype Sluice would
otherwise serve with there: CPUs without AVX-512). With `--dtype float32`, Sluice's float32
matmul (`linear_f32`, builds with AVX2) against oneDNN's float32.

For each row count: every projection shape of the model (SmolLM2-135M's by default), each timed
over as many distinct weights as the model has layers, so that weights stream from memory as in
a real step; the two implementations alternate shape by shape in this one process. Prints one
JSON line per shape and a summary per row count: the time of one step's projections (the layers'
four and the LM head once) with each.

    python benchmark/linear_kernel.py --rows 1 8 32 64 512
    python benchmark/linear_kernel.py --rows 1 8 32 64 512 --dtype float32

With `--against REV`, Sluice's matmul as it was at that git revision is timed as well, taking
turns with the others. With `--neighbour-load F`, a process pinned to the last CPU is busy for the
fraction F of the time (benchmark/neighbour.py), as the router or another tenant takes part of a
core in service: a split of the work that waits for its slowest thread shows there.

    python benchmark/linear_kernel.py --rows 1 32 --against HEAD~1 --neighbour-load 0.25
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "server"))

from neighbour import busy_neighbour
from sluice_server.kernels import load_cpu_kernels
from sluice_server.kernels.cpu_features import CpuFeatures

# (in_features, out_features, uses per step): SmolLM2-135M's fused qkv, o, fused gate/up, down,
# and the LM head.
SMOLLM2_SHAPES = [(576, 960, 30), (576, 576, 30), (576, 3072, 30), (1536, 576, 30), (576, 49152, 1)]


def time_us(function: Callable[[], object], calls: int) -> float:
    for _ in range(3):
        function()
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls * 1e6


def own_matmul(kernels: ModuleType, dtype: torch.dtype) -> tuple[Callable, Callable]:
    """The compiled kernels' (pack, multiply) for weights of `dtype`."""
    if dtype == torch.float32:
        return kernels.pack_linear_f32, kernels.linear_f32
    return kernels.pack_linear_bf16, kernels.linear_bf16


def time_shape(
    kernels: ModuleType,
    dtypes: tuple[torch.dtype, torch.dtype],
    shape: tuple[int, int, int],
    count: int,
    baseline: ModuleType | None,
) -> dict[str, float]:
    """Microseconds per call of each implementation on x [rows, in] and weights [out, in],
    cycling through `count` distinct weights; `dtypes`: Sluice's and oneDNN's."""
    rows, in_features, out_features = shape
    sluice_dtype, onednn_dtype = dtypes
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(out_features, in_features, generator=generator) for _ in range(count)]
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w.to(onednn_dtype), 32) for w in weights]
    pack, multiply = own_matmul(kernels, sluice_dtype)
    sluice = [pack(w.to(sluice_dtype)) for w in weights]
    x_full = torch.randn(rows, in_features, generator=generator)
    x_onednn = x_full.to(onednn_dtype)
    x = x_full.to(sluice_dtype)
    turn = iter(range(1 << 62))

    def run_onednn() -> object:
        weight = onednn[next(turn) % count]
        return torch.ops.mkldnn._linear_pointwise(x_onednn, weight, None, "none", [], "")

    def run_sluice() -> object:
        return multiply(x, sluice[next(turn) % count], None, out_features)

    calls = max(5, min(200, int(2e9 / (rows * in_features * out_features))))
    timings = {"onednn": time_us(run_onednn, calls), "sluice": time_us(run_sluice, calls)}
    if baseline is not None:
        baseline_pack, baseline_multiply = own_matmul(baseline, sluice_dtype)
        packed = [baseline_pack(w.to(sluice_dtype)) for w in weights]

        def run_baseline() -> object:
            return baseline_multiply(x, packed[next(turn) % count], None, out_features)

        timings["baseline"] = time_us(run_baseline, calls)
        # Once more after the baseline, so that a drifting machine moves both alike.
        timings["sluice"] = (timings["sluice"] + time_us(run_sluice, calls)) / 2
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64, 512])
    parser.add_argument("--weights", type=int, default=30, help="distinct weights per shape")
    parser.add_argument("--against", help="also time Sluice's matmul at this git revision")
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="Sluice's matmul to time: bfloat16 weights, or float32 ones (builds with AVX2)",
    )
    parser.add_argument(
        "--neighbour-load",
        type=float,
        default=0.0,
        help="fraction of the last CPU a busy neighbour process takes while timing",
    )
    args = parser.parse_args()

    kernels = load_cpu_kernels(Path.home() / ".cache" / "sluice" / "kernels")
    baseline = None
    if args.against:
        from quantized_kernel import kernels_at_revision

        baseline = kernels_at_revision(args.against, Path(tempfile.mkdtemp()))
    sluice_dtype = getattr(torch, args.dtype)
    if sluice_dtype == torch.float32:
        if not kernels.has_linear_f32():
            raise SystemExit("this CPU's kernel build has no float32 matmul (it needs AVX2)")
        onednn_dtype = torch.float32
    else:
        if not kernels.has_linear_bf16():
            raise SystemExit("this CPU has neither AVX512-BF16 nor AVX2: no Sluice matmul here")
        onednn_dtype = torch.bfloat16 if CpuFeatures.detect().onednn_bf16 else torch.float32
    dtypes = (sluice_dtype, onednn_dtype)
    onednn_name = str(onednn_dtype).removeprefix("torch.")
    print(json.dumps({"sluice_dtype": args.dtype, "onednn_dtype": onednn_name}))
    with busy_neighbour(args.neighbour_load):
        for rows in args.rows:
            time_rows(kernels, dtypes, rows, args.weights, baseline)


def time_rows(
    kernels: ModuleType,
    dtypes: tuple[torch.dtype, torch.dtype],
    rows: int,
    weight_count: int,
    baseline: ModuleType | None,
) -> None:
    """One JSON line per shape at `rows` rows, then one step's projections in total."""
    step_us: dict[str, float] = {}
    for in_features, out_features, uses in SMOLLM2_SHAPES:
        # The LM head is used once a step; two copies keep it from staying in cache.
        count = min(weight_count, uses) if uses > 1 else 2
        timings = time_shape(kernels, dtypes, (rows, in_features, out_features), count, baseline)
        flop = 2 * rows * in_features * out_features
        record = {"rows": rows, "shape": [in_features, out_features]}
        for name, micros in timings.items():
            step_us[name] = step_us.get(name, 0.0) + micros * uses
            record[f"{name}_us"] = round(micros, 1)
            record[f"{name}_gflops"] = round(flop / micros / 1e3)
        print(json.dumps(record))
    summary = {
        "rows": rows,
        "step_projections_ms": {k: round(v / 1e3, 2) for k, v in step_us.items()},
        "speedup": round(step_us["onednn"] / step_us["sluice"], 2),
    }
    if "baseline" in step_us:
        summary["speedup_over_baseline"] = round(step_us["baseline"] / step_us["sluice"], 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
