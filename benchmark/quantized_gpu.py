"""The quantized projections on a CUDA GPU (kernels/triton_quantized.py) against bfloat16's matmul
(`F.linear`, cuBLAS) and against dequantizing the weight on every call (what GPUs did before).

For each model and row count: one decoder layer's projections (fused qkv, o, fused gate/up, down)
of SmolLM2-135M and of an 8B Llama (Llama 3 8B's shapes), timed with CUDA events over many calls
after a warmup, each weight distinct per layer so that weights stream from GPU memory. Formats:
4-bit codes with offsets in groups of 128 (AWQ's and GPTQ's layout; 64 for SmolLM2, whose 576
features are not a multiple of 128), bitsandbytes' NF4 (levels, groups of 64), 8-bit integers in
groups of the same size (GPTQ 8-bit), FP8 with one scale per output
feature through the FP8 matmul (`torch._scaled_mm`, activations rounded to FP8 per row) and
through the Triton kernel. Activations are bfloat16; the codes are random.

    python benchmark/quantized_gpu.py --rows 1 16 64 256 2048 --out results.json

Prints a Markdown table of microseconds per layer and each format's speed against bfloat16
(above 1: faster), and writes the same as JSON. With `--sweep`, first times the Triton kernel's
tile configurations on the 8B layer's 4-bit weights at each row count, fastest first, and ranks
them as one shape for every row count (how `triton_quantized.TILES` was chosen), noting whether
each gives TILES's bits.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "server"))

from sluice_server.kernels import triton_quantized
from sluice_server.quant import CodeFormat, QuantizedWeight, pack_4bit

# (input features, output features) of a decoder layer's projections.
MODELS = {
    "SmolLM2-135M": [(576, 960), (576, 576), (576, 3072), (1536, 576)],
    "Llama-8B": [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)],
}
# AWQ's and GPTQ's group size for each model.
GROUP_SIZES = {"SmolLM2-135M": 64, "Llama-8B": 128}
GROUP = -1  # In FORMATS: the model's group size.
FORMATS = {
    # name: (code format, group size (0: per output feature), offsets)
    "4-bit (AWQ/GPTQ)": (CodeFormat.UINT4, GROUP, True),
    "NF4": (CodeFormat.LEVELS4, 64, False),
    "int8 (GPTQ 8-bit)": (CodeFormat.INT8, GROUP, False),
    "FP8 (Triton)": (CodeFormat.FLOAT8_E4M3, 0, False),
}
# Distinct weights per shape, so that one call's weight is not in L2 from the last (an 8B
# layer's gate/up at 4 bits is 59 MB; the H200's L2 is 60 MB).
COPIES = 4


def random_weight(
    in_features: int, out_features: int, code_format: CodeFormat, group_size: int, offsets: bool
) -> QuantizedWeight:
    group_size = group_size or in_features
    shape = (out_features, in_features)
    if code_format.bits == 4:
        codes = pack_4bit(torch.randint(0, 16, shape, device="cuda"))
    else:
        # Any byte but e4m3's NaNs (0x7f, 0xff); as int8, codes 0..126.
        codes = torch.randint(0, 127, shape, device="cuda", dtype=torch.uint8)
    groups = (out_features, in_features // group_size)
    levels = None
    if code_format is CodeFormat.LEVELS4:
        levels = torch.linspace(-1, 1, 16, device="cuda")
    return QuantizedWeight(
        codes=codes,
        scales=torch.rand(groups, device="cuda") / 64,
        offsets=torch.randn(groups, device="cuda") / 64 if offsets else None,
        code_format=code_format,
        group_size=group_size,
        levels=levels,
    )


def time_us(calls: list[Callable[[], object]], repeats: int) -> float:
    """Mean microseconds of one round through `calls`, after a warmup round."""
    for call in calls:
        call()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        for call in calls:
            call()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) * 1000 / repeats / COPIES


def layer_calls(model: str, rows: int) -> dict[str, list[Callable[[], object]]]:
    """Per implementation, the calls of COPIES layers' projections on `rows` rows."""
    calls: dict[str, list[Callable[[], object]]] = {}

    def add(name: str, call: Callable[[], object]) -> None:
        calls.setdefault(name, []).append(call)

    for _ in range(COPIES):
        for in_features, out_features in MODELS[model]:
            x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
            dense = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16)
            add("bfloat16 (cuBLAS)", lambda x=x, w=dense: F.linear(x, w))
            for name, (code_format, group_size, offsets) in FORMATS.items():
                if group_size == GROUP:
                    group_size = GROUP_SIZES[model]
                weight = random_weight(in_features, out_features, code_format, group_size, offsets)
                add(name, lambda x=x, w=weight: triton_quantized.quantized_matmul(x, w))
                if name.startswith("4-bit"):
                    add(
                        "4-bit dequantized per call",
                        lambda x=x, w=weight: F.linear(x, w.dequantize(torch.bfloat16)),
                    )
                if code_format is CodeFormat.FLOAT8_E4M3:
                    add(
                        "FP8 (scaled_mm)",
                        lambda x=x, w=weight: triton_quantized.scaled_mm_fp8(x, w),
                    )
    return calls


# The tile shapes the sweep times at every row count: one of them serves every row count
# (triton_quantized.TILES).
SWEEP_BLOCK_MS = (16, 64, 128)
SWEEP_BLOCK_NS = (32, 64, 128, 256)
SWEEP_LAUNCHES = ((4, 3), (4, 4), (8, 4))


def sweep(rows_list: list[int], repeats: int) -> dict[str, Any]:
    """Microseconds of the 8B layer's 4-bit projections per tile configuration and row count,
    whether each gives TILES's bits, and the configurations ranked as one shape for every row
    count (the geometric mean over row counts of time / that row count's fastest)."""
    code_format, _, offsets = FORMATS["4-bit (AWQ/GPTQ)"]
    group_size = GROUP_SIZES["Llama-8B"]
    timings: dict[str, dict[int, float]] = {}
    same_bits: dict[str, bool] = {}
    for rows in rows_list:
        pairs = []
        for in_features, out_features in MODELS["Llama-8B"] * COPIES:
            x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
            pairs.append(
                (x, random_weight(in_features, out_features, code_format, group_size, offsets))
            )
        expected = triton_quantized.quantized_matmul(*pairs[0])
        for block_m in SWEEP_BLOCK_MS:
            for block_n in SWEEP_BLOCK_NS:
                for warps, stages in SWEEP_LAUNCHES:
                    config = triton_quantized.TileConfig(block_m, block_n, warps, stages)
                    calls = [
                        lambda x=x, w=w, c=config: triton_quantized.quantized_matmul(x, w, None, c)
                        for x, w in pairs
                    ]
                    try:
                        out = calls[0]()
                        # Each configuration's output against TILES's.
                        error = (out.float() - expected.float()).abs().max().item()
                        if error > 1e-2 * expected.float().abs().max().item():
                            raise ValueError(f"output differs by {error}")
                        same_bits[str(config)] = same_bits.get(str(config), True) and bool(
                            torch.equal(out, expected)
                        )
                        timings.setdefault(str(config), {})[rows] = time_us(calls, repeats)
                    except Exception as failure:  # Too large for the GPU, or wrong.
                        print(f"  {config}: {failure}")
        fastest = sorted((t[rows], name) for name, t in timings.items() if rows in t)
        print(f"rows {rows}, TILES {triton_quantized.TILES}:")
        for us, name in fastest[:4]:
            print(f"  {us:9.1f} us  {name}")
        del pairs
    best = {rows: min(t[rows] for t in timings.values() if rows in t) for rows in rows_list}
    every_row_count = {
        name: math.exp(sum(math.log(t[rows] / best[rows]) for rows in rows_list) / len(rows_list))
        for name, t in timings.items()
        if len(t) == len(rows_list)
    }
    ranked = sorted(every_row_count.items(), key=lambda pair: pair[1])
    print("one shape for every row count (time / each row count's fastest, geometric mean):")
    for name, score in ranked[:6]:
        cells = ", ".join(f"{rows}: {timings[name][rows]:.1f}" for rows in rows_list)
        print(f"  {score:5.2f}x  {name}  ({cells} us; TILES's bits: {same_bits[name]})")
    return {
        "us": timings,
        "same_bits_as_tiles": same_bits,
        "every_row_count": ranked,
        "tiles": str(triton_quantized.TILES),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 256, 2048])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, help="where to write the results as JSON")
    parser.add_argument("--sweep", action="store_true", help="time tile configurations first")
    args = parser.parse_args()
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": []}
    if args.sweep:
        results["sweep"] = sweep(args.rows, args.repeats)
    for model in MODELS:
        for rows in args.rows:
            calls = layer_calls(model, rows)
            times = {name: time_us(c, args.repeats) for name, c in calls.items()}
            results["layers"].append({"model": model, "rows": rows, "us": times})
            del calls
            torch.cuda.empty_cache()
    names = list(results["layers"][0]["us"])
    bf16 = names[0]
    print(f"{results['gpu']}, torch {results['torch']}: microseconds per decoder layer's "
          "projections (speed against bfloat16)\n")
    print("| model | rows | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for entry in results["layers"]:
        us = entry["us"]
        cells = [f"{us[bf16]:.1f}"] + [
            f"{us[n]:.1f} ({us[bf16] / us[n]:.2f}x)" for n in names[1:]
        ]
        print(f"| {entry['model']} | {entry['rows']} | " + " | ".join(cells) + " |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
