"""Compiles the quantized-weight Triton kernel for each case read as JSON from stdin (code format,
group size, offsets, activations' dtype, compute capability), without a GPU, and writes each
one's shared memory or error as JSON to stdout. test_triton_compile.py runs it."""

import json
import sys
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]

from sluice_server.kernels import triton_quantized  # noqa: E402
from sluice_server.quant import CodeFormat  # noqa: E402
from quantized_weights import random_weight  # noqa: E402

POINTER_TYPES = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}


def compile_case(case: dict) -> dict:
    weight = random_weight(
        64, 256, CodeFormat(case["code_format"]), case["group_size"], case["offsets"]
    )
    config = triton_quantized.TILES
    kernel = triton_quantized._quantized_matmul_kernel
    constants = triton_quantized.kernel_constants(weight, config, interpreted=False)
    activations = POINTER_TYPES[case["dtype"]]
    pointers = {"x_ptr": activations, "out_ptr": activations, "codes_ptr": "*u8"}
    signature = {
        name: "constexpr"
        if name in constants
        else pointers.get(name, "*fp32" if name.endswith("_ptr") else "i32")
        for name in kernel.arg_names
    }
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
    target = GPUTarget("cuda", case["capability"], 32)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    try:
        compiled = triton.compile(source, target=target, options=options)
    except Exception as error:  # Reported per case, for the test to show.
        return {"error": f"{type(error).__name__}: {error}"}
    if not compiled.asm.get("cubin"):
        return {"error": "no cubin"}
    return {"shared": compiled.metadata.shared}


def main() -> None:
    torch.manual_seed(0)
    json.dump([compile_case(case) for case in json.load(sys.stdin)], sys.stdout)


if __name__ == "__main__":
    main()
