"""AWQ checkpoints in AutoAWQ's GEMM layout, read into the kernel's layout.

A projection of K inputs and N outputs, quantized to 4 bits per group of G inputs, is stored as

- `qweight` int32 [K, N / 8]: the codes 0..15, 8 output features per word;
- `qzeros` int32 [K / G, N / 8]: each group's zero point, packed the same way;
- `scales` float16 [K / G, N];

and W[n, k] = scales[g, n] * (code[k, n] - zero[g, n]) for g = k / G. Within a word, the 4-bit
field i (lowest first) holds output feature `PACK_ORDER[i]` of the word's 8.
"""

import torch

from .packed import unpack_int32
from .weight import CodeFormat, QuantizedWeight, pack_4bit

PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Field holding output feature j of a word: PACK_ORDER's inverse.
_FIELD_OF_FEATURE = tuple(PACK_ORDER.index(feature) for feature in range(8))


def read_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> QuantizedWeight:
    codes = _unpack(qweight)  # [K, N]
    zeros = _unpack(qzeros).float()  # [K / G, N]
    scales = scales.float()
    if codes.shape[0] != scales.shape[0] * group_size or zeros.shape != scales.shape:
        raise ValueError(
            f"AWQ qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)} and scales "
            f"{tuple(scales.shape)} do not fit a group size of {group_size}"
        )
    # scales * (code - zero) as scales * code + offsets.
    return QuantizedWeight(
        codes=pack_4bit(codes.t()),
        scales=scales.t(),
        offsets=(-scales * zeros).t(),
        code_format=CodeFormat.UINT4,
        group_size=group_size,
    )


def _unpack(words: torch.Tensor) -> torch.Tensor:
    fields = unpack_int32(words, 4, along_rows=False)
    rows = fields.shape[0]
    return fields.view(rows, -1, 8)[..., _FIELD_OF_FEATURE].reshape(rows, -1)
