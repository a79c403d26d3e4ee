"""GPTQ checkpoints (AutoGPTQ's and GPTQModel's layout), read into the kernel's layout.

A projection of K inputs and N outputs, quantized to `bits` (4 or 8) per group of G inputs, is
stored as

- `qweight` int32 [K * bits / 32, N]: the codes 0..2^bits - 1, packed along the inputs;
- `qzeros` int32 [K / G, N * bits / 32]: each group's zero point, packed along the outputs;
- `scales` float16 [K / G, N];
- `g_idx` int32 [K]: the group of each input feature, k / G unless the checkpoint was quantized
  in act-order (`desc_act`), where groups gather features in order of importance;

and W[n, k] = scales[g, n] * (code[k, n] - zero[g, n]) for g = g_idx[k]. GPTQ's original format
stores each zero point minus one (`gptq`); GPTQModel's `gptq_v2` stores it as it is.
"""

import torch

from .packed import unpack_int32
from .weight import CodeFormat, QuantizedWeight, pack_4bit


def read_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    zeros_minus_one: bool,
) -> QuantizedWeight:
    if bits not in (4, 8):
        raise ValueError(f"{bits}-bit GPTQ is not supported (4 or 8 bits)")
    codes = unpack_int32(qweight, bits, along_rows=True).t()  # [N, K]
    zeros = unpack_int32(qzeros, bits, along_rows=False).float()  # [K / G, N]
    if zeros_minus_one:
        zeros += 1
    scales = scales.float()
    out_features, in_features = codes.shape
    groups = scales.shape[0]
    if zeros.shape != scales.shape or in_features % groups or scales.shape[1] != out_features:
        raise ValueError(
            f"GPTQ qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)} and scales "
            f"{tuple(scales.shape)} do not fit together"
        )
    group_size = in_features // groups
    input_order = _act_order(g_idx, in_features, group_size)
    if input_order is not None:
        codes = codes[:, input_order]
    if bits == 4:
        packed, offsets = pack_4bit(codes), -scales * zeros
    else:
        # The kernel's 8-bit codes are signed: code - 128, the 128 moved into the offsets.
        packed, offsets = (codes - 128).to(torch.int8), scales * (128 - zeros)
    return QuantizedWeight(
        codes=packed,
        scales=scales.t(),
        offsets=offsets.t(),
        code_format=CodeFormat.UINT4 if bits == 4 else CodeFormat.INT8,
        group_size=group_size,
        input_order=input_order,
    )


def _act_order(
    g_idx: torch.Tensor | None, in_features: int, group_size: int
) -> torch.Tensor | None:
    """The input features sorted by group, where g_idx does not already list them so; None
    where it does."""
    consecutive = torch.arange(in_features) // group_size
    if g_idx is None or torch.equal(g_idx.long(), consecutive):
        return None
    order = torch.argsort(g_idx.long(), stable=True)
    if not torch.equal(g_idx.long()[order], consecutive):
        raise ValueError(f"GPTQ g_idx does not put {group_size} input features in every group")
    return order
