"""The quantized matmul (`linear_quantized` in the compiled CPU kernels) per code format against
Sluice's bfloat16 matmul (`linear_bf16`), on the projections of SmolLM2-135M.

For each row count and format: every projection shape (the fused qkv, o, fused gate/up, down),
each timed over as many distinct weights as the model has layers, so that weights stream from
memory as in a real step; the implementations alternate shape by shape in this one process.
Prints one JSON line per row count: the time of one step's projections with each, and each
format's speed relative to bfloat16 (above 1: faster). The weights are random, quantized with
Sluice's own quantizers (`--quantize fp8`, bitsandbytes', and 4-bit integers with offsets as
AWQ, GPTQ and GGUF's Q4_1 hold them); activations are bfloat16.

    python benchmark/quantized_kernel.py --rows 1 4 32 128

Each weight is prepared as a bfloat16 model's is at load (`Ops.prepare_quantized`: integer codes
regrouped into tile order for AMX's tiles, or 4-bit and FP8 ones for AVX512-BF16's dot products).
With `--against REV`, the quantized kernel as it was at that git revision is built and timed too,
on the same weights as loaded ("uint4@REV", ...). With `--prompt-rows`, each format is also timed
with every row marked as a prompt's ("uint4 prompt", ...), the path a prompt's tokens take. With
`--column-order`, each format is also timed with its codes as loaded ("uint4 column order", ...):
where preparing regroups them, the path they take unprepared (a float32 model's, or the kernel's
before tile order), in the same run. With `--also-build avx512`, bfloat16 and every format are also
timed with the kernels built for that instruction set ("uint4 [avx512]", ...; on a CPU with AMX,
the paths of AVX-512 CPUs without it), prepared as that build prepares them; with `--column-order`
too, that build's unprepared paths as well ("uint4 [avx512] column order").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "server"))
sys.path.insert(0, str(REPO / "benchmark"))

from linear_kernel import time_us
from sluice_server.kernels import Kernels
from sluice_server.kernels.build import ISA_FLAGS, KernelBuild, put_ninja_on_path
from sluice_server.kernels.cpu_features import CpuFeatures
from sluice_server.layers.ops import CompiledCpuOps
from sluice_server.quant import CodeFormat, QuantizedWeight
from sluice_server.quant.at_load import quantize_4bit, quantize_int8
from sluice_server.quant.fp8 import quantize_fp8

# (in_features, out_features): SmolLM2-135M's projections, each used by its 30 layers.
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]
LAYERS = 30


def uint4_with_offsets(weight: torch.Tensor) -> QuantizedWeight:
    """4-bit integer codes with a scale and offset per group of 32 (Q4_1's, and AWQ's and
    GPTQ's with a zero point): the NF4 codes reinterpreted, which times the same."""
    codes = quantize_4bit(weight, "nf4")
    groups = weight.shape[1] // 32
    return QuantizedWeight(
        codes.codes,
        torch.rand(weight.shape[0], groups),
        torch.rand(weight.shape[0], groups),
        CodeFormat.UINT4,
        32,
    )


FORMATS = {
    "uint4": uint4_with_offsets,
    "int8": quantize_int8,
    "fp8": quantize_fp8,
    "nf4": lambda w: quantize_4bit(w, "nf4"),
}


KERNEL_SOURCES = "server/sluice_server/kernels/csrc"


def kernels_at_revision(revision: str, work: Path) -> ModuleType:
    """The compiled CPU kernels as they were at `revision`, built in `work` as this CPU's (capped
    by SLUICE_MAX_CPU_ISA where it is set)."""
    from torch.utils import cpp_extension

    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision, KERNEL_SOURCES],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(work)], input=archive, check=True)
    put_ninja_on_path()
    build = KernelBuild(CpuFeatures.detect().kernel_isa)
    return cpp_extension.load(
        name="sluice_kernels_baseline",
        sources=[str(p) for p in sorted((work / KERNEL_SOURCES).glob("*.cpp"))],
        extra_cflags=build.compiler_flags,
        extra_ldflags=build.linker_flags,
        build_directory=str(work),
        verbose=False,
    )


PROMPT = " prompt"
COLUMN_ORDER = " column order"


def multiply(ops: CompiledCpuOps, x: torch.Tensor, weights: list, prompt: bool) -> Callable:
    """A call of x against the next of `weights` (bfloat16 packed, or quantized; with `prompt`,
    every row a prompt's)."""
    turn = iter(range(1 << 62))
    every_row = torch.arange(x.shape[0])

    def call() -> object:
        weight = weights[next(turn) % len(weights)]
        if isinstance(weight, QuantizedWeight):
            return ops.quantized_linear(x, weight, None, every_row if prompt else None)
        return ops.packed_linear(x, weight)

    return call


def prepared_weights(
    ops: CompiledCpuOps, name: str, weights: list[torch.Tensor], loaded: dict[str, list]
) -> list:
    """bfloat16's weights packed, or a format's prepared for a bfloat16 model, by `ops`."""
    held_as = name.split(" [")[0]
    if held_as == "bfloat16":
        return [ops.pack_linear(w.bfloat16(), None) for w in weights]
    return [ops.prepare_quantized(q, torch.bfloat16) for q in loaded[held_as]]


def timed_weights(name: str, prepared: dict[str, list], loaded: dict[str, list]) -> list:
    """The weights a timed name multiplies: as loaded for another revision's kernel and for
    column order, else as prepared."""
    if "@" in name:
        return loaded[name.split("@")[0]]
    if name.endswith(COLUMN_ORDER):
        return loaded[name.removesuffix(COLUMN_ORDER).split(" [")[0]]
    return prepared[name.removesuffix(PROMPT)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 32, 128])
    parser.add_argument("--against", help="also time the quantized kernel at this git revision")
    parser.add_argument(
        "--prompt-rows", action="store_true", help="also time each format on a prompt's rows"
    )
    parser.add_argument(
        "--column-order", action="store_true", help="also time each format's codes as loaded"
    )
    parser.add_argument(
        "--also-build",
        choices=[isa for isa in ISA_FLAGS if isa != "native"],
        help="also time bfloat16 and every format with the kernels built for this ISA",
    )
    args = parser.parse_args()
    cache = Path.home() / ".cache" / "sluice" / "kernels"
    ops = Kernels.compiled_cpu(cache).ops
    implementations = {name: ops for name in ["bfloat16", *FORMATS]}
    if args.also_build:
        other = Kernels.compiled_cpu(cache, KernelBuild(args.also_build)).ops
        implementations |= {
            f"{name} [{args.also_build}]": other for name in ["bfloat16", *FORMATS]
        }
    if args.prompt_rows:
        implementations |= {name + PROMPT: ops for name in FORMATS}
    if args.column_order:
        implementations |= {name + COLUMN_ORDER: ops for name in FORMATS}
        if args.also_build:
            implementations |= {
                f"{name} [{args.also_build}]{COLUMN_ORDER}": other for name in FORMATS
            }
    if args.against:
        work = Path(tempfile.mkdtemp(prefix="quantized-kernel-"))
        baseline = CompiledCpuOps(kernels_at_revision(args.against, work), CpuFeatures.detect())
        implementations |= {f"{name}@{args.against}": baseline for name in FORMATS}
    generator = torch.Generator().manual_seed(0)
    layers = {
        shape: [torch.randn(shape[1], shape[0], generator=generator) / 16 for _ in range(LAYERS)]
        for shape in SHAPES
    }
    # Each format's weights as a model loads them, and as the ops prepare them for this CPU (the
    # layout the kernel at --against reads is the former).
    loaded = {
        shape: {name: [quantize(w) for w in weights] for name, quantize in FORMATS.items()}
        for shape, weights in layers.items()
    }
    held = {
        shape: {
            name: prepared_weights(held_by, name, weights, loaded[shape])
            for name, held_by in implementations.items()
            if name.split(" [")[0] in ("bfloat16", *FORMATS) and not name.endswith(COLUMN_ORDER)
        }
        for shape, weights in layers.items()
    }
    for shape, named in held.items():
        named |= {
            name: timed_weights(name, named, loaded[shape])
            for name in implementations
            if name not in named
        }
    for rows in args.rows:
        step_us = dict.fromkeys(implementations, 0.0)
        for shape in SHAPES:
            x = torch.randn(rows, shape[0], generator=generator).bfloat16()
            calls = max(LAYERS, min(300, int(3e9 / (rows * shape[0] * shape[1]))))
            for name, weights in held[shape].items():
                step_us[name] += (
                    time_us(
                        multiply(implementations[name], x, weights, name.endswith(PROMPT)), calls
                    )
                    * LAYERS
                )
        bf16 = step_us["bfloat16"]
        print(
            json.dumps(
                {
                    "rows": rows,
                    "step_projections_ms": {k: round(v / 1e3, 2) for k, v in step_us.items()},
                    "speed_vs_bfloat16": {k: round(bf16 / v, 2) for k, v in step_us.items()},
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
