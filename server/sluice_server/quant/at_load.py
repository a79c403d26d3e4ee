"""Quantizing an unquantized checkpoint's projections as they load: `--quantize fp8` (e4m3 per
output feature) and bitsandbytes' methods, through the `bitsandbytes` library's own quantizers:

- `bitsandbytes` (LLM.int8's weights): int8 per output feature, scaled by its largest magnitude;
- `bitsandbytes-nf4` / `bitsandbytes-fp4`: 4-bit indexes into the NF4 or FP4 table, scaled by
  the largest magnitude of each block of 64 weights.

The codes are then multiplied by Sluice's quantized kernel with the activations left in the
model's dtype. (bitsandbytes' own LLM.int8 matmul also rounds the activations to int8, except
for outlier features; keeping them all unrounded is its outlier path's precision throughout.)

The LM head stays unquantized, as transformers and vLLM leave it.
"""

from collections.abc import Callable
from types import ModuleType
from typing import Protocol

import torch

from .fp8 import quantize_fp8
from .weight import CODE_BLOCK, CodeFormat, QuantizedWeight, pack_4bit

# bitsandbytes' default block size for NF4 and FP4.
BITSANDBYTES_4BIT_BLOCK = 64


class StoredTensors(Protocol):
    """A checkpoint's tensors as stored."""

    def stored(self, name: str) -> torch.Tensor: ...

    def stored_shape(self, name: str) -> tuple[int, ...]: ...

    def __contains__(self, name: str) -> bool: ...


def quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    functional = _bitsandbytes()
    codes, row_absmax, _ = functional.int8_vectorwise_quant(weight.float())
    return QuantizedWeight(
        codes=codes.contiguous(),
        scales=(row_absmax.float() / 127).reshape(-1, 1),
        offsets=None,
        code_format=CodeFormat.INT8,
        group_size=weight.shape[1],
    )


def quantize_4bit(weight: torch.Tensor, table: str) -> QuantizedWeight:
    functional = _bitsandbytes()
    packed, state = functional.quantize_4bit(
        weight.float(),
        blocksize=BITSANDBYTES_4BIT_BLOCK,
        compress_statistics=False,
        quant_type=table,
    )
    # bitsandbytes packs two codes per byte, the first in the high nibble.
    rows = weight.shape[0]
    codes = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 0x0F], dim=-1).reshape(rows, -1)
    return QuantizedWeight(
        codes=pack_4bit(codes),
        scales=state.absmax.float().reshape(rows, -1),
        offsets=None,
        code_format=CodeFormat.LEVELS4,
        group_size=BITSANDBYTES_4BIT_BLOCK,
        levels=state.code.float(),
    )


def _bitsandbytes() -> ModuleType:
    """bitsandbytes' functions, imported only when a method asks for them."""
    try:
        from bitsandbytes import functional
    except ImportError as error:
        raise ValueError(
            f"--quantize bitsandbytes needs the bitsandbytes package ({error}); "
            "pip install bitsandbytes"
        ) from error
    return functional


# Each method's quantizer and the input features its groups need K to be a multiple of.
QUANTIZERS: dict[str, tuple[Callable[[torch.Tensor], QuantizedWeight], int]] = {
    "fp8": (quantize_fp8, CODE_BLOCK),
    "bitsandbytes": (quantize_int8, CODE_BLOCK),
    "bitsandbytes-nf4": (lambda w: quantize_4bit(w, "nf4"), BITSANDBYTES_4BIT_BLOCK),
    "bitsandbytes-fp4": (lambda w: quantize_4bit(w, "fp4"), BITSANDBYTES_4BIT_BLOCK),
}


class LoadTimeQuantizer:
    """A checkpoint's projections, quantized with `method` as the layers read them (by the
    weight's full name). A projection whose input features do not split into the method's
    groups stays unquantized."""

    def __init__(self, method: str, tensors: StoredTensors) -> None:
        self._quantize, self._multiple = QUANTIZERS[method]
        self._tensors = tensors

    def holds(self, name: str) -> bool:
        if name.startswith("lm_head.") or not name.endswith(".weight") or name not in self._tensors:
            return False
        shape = self._tensors.stored_shape(name)
        return len(shape) == 2 and shape[1] % self._multiple == 0

    def get(self, name: str) -> QuantizedWeight | None:
        if not self.holds(name):
            return None
        return self._quantize(self._tensors.stored(name))
