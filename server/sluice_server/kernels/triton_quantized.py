"""The quantized projections on a GPU: a Triton matmul that multiplies activations by weights held
as 4- or 8-bit codes (W4A16 and W8A16: AWQ, GPTQ, GGUF, bitsandbytes, FP8 with grouped scales),
and FP8 weights with one scale per output feature through the GPU's FP8 matmul
(`torch._scaled_mm`) where it has one (compute capability 8.9 and later).

The Triton kernel reads the codes in `QuantizedWeight`'s layout, the one the CPU kernel reads, so
a checkpoint is packed once for every device. Each program computes a [BLOCK_M, BLOCK_N] tile of
the output: per step along the input features it loads BLOCK_K features' codes for BLOCK_N
outputs, turns them into values with their group's scale and offset in float32, rounds them to
the activations' dtype and multiplies on the tensor cores, summing in float32. BLOCK_K divides the
group size, so a step needs one scale per output. A step reads its codes as they lie (4-bit codes
as whole bytes, each byte's two nibbles multiplied as two halves), so the loads are contiguous.

Triton's interpreter (`TRITON_INTERPRET=1`) runs the same kernel on CPU tensors, which is how the
tests check it without a GPU. Its `tl.dot` is numpy's matmul: wrong sums in bfloat16 (Triton
3.6), and float32 sums that on some CPUs depend on a row's place in the tile, so there a tile's
products are summed in float32 by `tl.sum`, in the same order for every output.
"""

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..quant import CodeFormat, QuantizedWeight
from ..quant.weight import CODE_BLOCK

# The largest FP8 e4m3 number: activations are scaled per row so that their largest fits it.
FLOAT8_E4M3_MAX = 448.0


@triton.jit
def _code_values(codes, levels_ptr, CODE_FORMAT: tl.constexpr):
    """The float32 value of each code, before scale and offset: `codes` are 4-bit codes
    (0..15) or bytes."""
    if CODE_FORMAT == 0:  # UINT4
        return codes.to(tl.float32)
    if CODE_FORMAT == 3:  # LEVELS4: an index into the 16 levels
        return tl.load(levels_ptr + codes.to(tl.int32))
    if CODE_FORMAT == 1:  # INT8
        return codes.to(tl.int8, bitcast=True).to(tl.float32)
    # FLOAT8_E4M3 from its bits (GPUs before compute capability 8.9 and the interpreter have no
    # FP8 conversion): sign, 4 exponent bits (bias 7) and 3 mantissa bits; exponent 0 is
    # subnormal (mantissa / 8 * 2^-6).
    byte = codes.to(tl.int32)
    exponent = (byte >> 3) & 0xF
    mantissa = byte & 0x7
    normal = (8 + mantissa).to(tl.float32) * tl.exp2((exponent - 10).to(tl.float32))
    magnitude = tl.where(exponent == 0, mantissa.to(tl.float32) * (1.0 / 512.0), normal)
    return tl.where(byte >= 128, -magnitude, magnitude)


@triton.jit
def _accumulate(
    acc,
    x_ptr,
    x_row_stride,
    row,
    row_in,
    feature,
    codes,
    scales_ptr,
    offsets_ptr,
    levels_ptr,
    col_in,
    group,
    CODE_FORMAT: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """acc + x[row, feature] @ W[feature, col]: W's codes [features, cols], all of one group
    per column (`group`: each column's index into the scales)."""
    x = tl.load(
        x_ptr + row[:, None] * x_row_stride + feature[None, :], mask=row_in[:, None], other=0.0
    )
    weight = _code_values(codes, levels_ptr, CODE_FORMAT)
    weight *= tl.load(scales_ptr + group, mask=col_in, other=0.0)[None, :]
    if HAS_OFFSETS:
        weight += tl.load(offsets_ptr + group, mask=col_in, other=0.0)[None, :]
    if INTERPRETED:
        # Not `tl.dot` (numpy's matmul here): see the module's docstring.
        products = x.to(tl.float32)[:, :, None] * weight[None, :, :]
        return acc + tl.sum(products, axis=1)
    if x.dtype == tl.float32:
        return acc + tl.dot(x, weight, input_precision="ieee")
    return acc + tl.dot(x, weight.to(x.dtype))


@triton.jit
def _quantized_matmul_kernel(
    x_ptr,
    codes_ptr,
    scales_ptr,
    offsets_ptr,
    levels_ptr,
    out_ptr,
    rows,
    out_features,
    in_features,
    group_size,
    x_row_stride,
    codes_row_stride,
    scales_row_stride,
    out_row_stride,
    CODE_FORMAT: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # 64-bit indexes: a long prompt's rows times a large vocabulary pass 2^31 elements.
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = row < rows
    col_in = col < out_features
    scale_row = col * scales_row_stride
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, in_features, BLOCK_K):
        if CODE_FORMAT == 0 or CODE_FORMAT == 3:
            # Features [start, start + BLOCK_K) are bytes [start / 2, (start + BLOCK_K) / 2),
            # read once: in each 16 bytes the low nibbles hold 16 features, the high nibbles the
            # next 16, each half multiplied on its own. Only a group of 16 (with BLOCK_K 32)
            # puts the halves in two groups.
            byte = tl.arange(0, BLOCK_K // 2)
            packed = tl.load(
                codes_ptr + col[None, :] * codes_row_stride + (start // 2 + byte)[:, None],
                mask=col_in[None, :],
                other=0,
            )
            low = start + byte // 16 * 32 + byte % 16
            acc = _accumulate(
                acc, x_ptr, x_row_stride, row, row_in, low, packed & 0xF, scales_ptr,
                offsets_ptr, levels_ptr, col_in, scale_row + start // group_size,
                CODE_FORMAT, HAS_OFFSETS, INTERPRETED,
            )  # fmt: skip
            acc = _accumulate(
                acc, x_ptr, x_row_stride, row, row_in, low + 16, packed >> 4, scales_ptr,
                offsets_ptr, levels_ptr, col_in, scale_row + (start + 16) // group_size,
                CODE_FORMAT, HAS_OFFSETS, INTERPRETED,
            )  # fmt: skip
        else:
            feature = start + tl.arange(0, BLOCK_K)
            codes = tl.load(
                codes_ptr + col[None, :] * codes_row_stride + feature[:, None],
                mask=col_in[None, :],
                other=0,
            )
            acc = _accumulate(
                acc, x_ptr, x_row_stride, row, row_in, feature, codes, scales_ptr,
                offsets_ptr, levels_ptr, col_in, scale_row + start // group_size,
                CODE_FORMAT, HAS_OFFSETS, INTERPRETED,
            )  # fmt: skip
    out = out_ptr + row[:, None] * out_row_stride + col[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_in[:, None] & col_in[None, :])


@dataclass(frozen=True)
class TileConfig:
    """A program's output tile and its launch settings."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3


# One tile shape for every row count, so that a row's output does not depend on its batch. The
# tensor-core instruction follows the tile's height (on Hopper, wgmma from 64 rows, mma.sync
# below), and so do a sum's bits: on an H200 every 16-row shape gave other bits than this one,
# every 64- and 128-row shape the same. Shapes chosen by row count (16 rows for decode, 64 for
# prompts) made 22 of 32 concurrent AWQ requests differ from the same request alone. This shape
# was the fastest for every row count (`benchmark/quantized_gpu.py --sweep`, docs/gpu.md):
# 1.42x each row count's fastest time, geometric mean over 1, 16, 256 and 2,048 rows.
TILES = TileConfig(64, 64, num_warps=4, num_stages=3)


def block_k(weight: QuantizedWeight) -> int:
    """Features per step: a divisor of the group size, so that a step takes one scale per
    output (two for 4-bit codes in groups of 16), at least 16 (tl.dot's least), and whole
    32-feature code blocks for 4-bit codes."""
    size = math.gcd(weight.group_size, 4 * CODE_BLOCK)
    return max(size, CODE_BLOCK) if weight.bits == 4 else size


def kernel_constants(
    weight: QuantizedWeight, config: TileConfig, interpreted: bool
) -> dict[str, int | bool]:
    """The kernel's compile-time arguments for this weight and tile."""
    return {
        "CODE_FORMAT": int(weight.code_format),
        "HAS_OFFSETS": weight.offsets is not None,
        "INTERPRETED": interpreted,
        "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n,
        "BLOCK_K": block_k(weight),
    }


def quantized_matmul(
    x: torch.Tensor,
    weight: QuantizedWeight,
    bias: torch.Tensor | None = None,
    config: TileConfig = TILES,
) -> torch.Tensor:
    """x W^T + b for x [..., K] and a quantized W [N, K] in column order, on the GPU (or on CPU
    tensors under Triton's interpreter). `config` other than TILES: for benchmarks only."""
    if weight.tile_order:
        raise ValueError("the Triton kernel reads codes in column order, not the CPU's tile order")
    if x.shape[-1] != weight.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {weight.in_features}")
    if weight.input_order is not None:
        x = x.index_select(-1, weight.input_order)
    leading = x.shape[:-1]
    x = x.reshape(-1, weight.in_features).contiguous()
    rows, out_features = x.shape[0], weight.out_features
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    if rows > 0:
        grid = (triton.cdiv(rows, config.block_m), triton.cdiv(out_features, config.block_n))
        scales = weight.scales.float().contiguous()
        offsets = None if weight.offsets is None else weight.offsets.float().contiguous()
        levels = None if weight.levels is None else weight.levels.float().contiguous()
        codes = weight.codes.view(torch.uint8).contiguous()
        _quantized_matmul_kernel[grid](
            x,
            codes,
            scales,
            offsets if offsets is not None else scales,
            levels if levels is not None else scales,
            out,
            rows,
            out_features,
            weight.in_features,
            weight.group_size,
            x.stride(0),
            codes.stride(0),
            scales.stride(0),
            out.stride(0),
            **kernel_constants(weight, config, interpreted=x.device.type == "cpu"),
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
    if bias is not None:
        out += bias.to(out.dtype)
    return out.view(*leading, out_features)


def takes_scaled_mm(x: torch.Tensor, weight: QuantizedWeight) -> bool:
    """Whether `scaled_mm_fp8` multiplies x by this weight: FP8 codes with one scale per output
    feature (per tensor is that too), no offsets or act-order, 16-aligned shapes, 16-bit
    activations (float32 models keep the weight-only kernel), on a GPU with FP8 tensor cores.
    It depends on the weight and dtype alone, not on the row count, so that a row takes the same
    path, and gets the same result, in any batch (each row's activations have their own
    scale)."""
    return (
        weight.code_format is CodeFormat.FLOAT8_E4M3
        and weight.group_size == weight.in_features
        and weight.offsets is None
        and weight.input_order is None
        and weight.in_features % 16 == 0
        and weight.out_features % 16 == 0
        and x.dtype in (torch.bfloat16, torch.float16)
        and x.device.type == "cuda"
        and torch.cuda.get_device_capability(x.device) >= (8, 9)
    )


def scaled_mm_fp8(
    x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x W^T + b with both in FP8: x rounded to e4m3 with one scale per row (its largest
    magnitude over FLOAT8_E4M3_MAX), multiplied on the FP8 tensor cores, each output scaled by
    its row's and its output feature's scales."""
    leading = x.shape[:-1]
    x = x.reshape(-1, weight.in_features)
    row_scales = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FLOAT8_E4M3_MAX
    x_fp8 = (x.float() / row_scales).clamp(-FLOAT8_E4M3_MAX, FLOAT8_E4M3_MAX)
    out = torch._scaled_mm(
        x_fp8.to(torch.float8_e4m3fn),
        weight.codes.view(torch.float8_e4m3fn).t(),
        scale_a=row_scales,
        scale_b=weight.scales.float().reshape(1, -1),
        out_dtype=torch.bfloat16,
    ).to(x.dtype)
    if bias is not None:
        out += bias.to(out.dtype)
    return out.view(*leading, weight.out_features)
