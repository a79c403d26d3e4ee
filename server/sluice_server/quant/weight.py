"""A projection's weight held quantized: per output feature n and group g of `group_size`
consecutive input features, W[n, k] = scales[n, g] * value(code[n, k]) + offsets[n, g] (no
offsets: symmetric codes), where a code's value is the integer it holds, the FP8 number its bits
make, or its entry in a table of 16 `levels` (bitsandbytes' NF4 and FP4).

GPTQ's act-order groups input features that are not consecutive; such a weight holds its columns
sorted by group, and `input_order` says which input feature each column multiplies (the kernel's
input is gathered in that order first).

The codes' layout is the one Sluice's CPU kernel reads (csrc/linear_quantized.cpp):

- 4 bits (`UINT4`, 0..15, and `LEVELS4`): uint8 [N, K / 2], each 32 input features as 16 bytes
  whose low nibbles hold the first 16 and high nibbles the next 16 (GGUF's Q4 block layout);
- 8 bits (`INT8`, -128..127, and `FLOAT8_E4M3`): one byte per feature, [N, K].

Every format Sluice loads (GGUF blocks, AWQ, GPTQ and FP8 checkpoints, weights quantized at load)
is repacked into this one, so that one kernel serves them all. Where the CPU has AMX, a layer's
integer codes, scales and offsets are then regrouped once more for its tiles (`tile_order`,
made by the compiled ops when the model is prepared for the CPU), and so are a bfloat16 model's
4-bit integer codes on AVX512-BF16 CPUs without AMX and its FP8 codes and 4-bit level codes on
any AVX512-BF16 CPU, for the kernel's dot products (or AMX's bfloat16 tiles): the same values in
another order, which `in_column_order` undoes.
"""

from dataclasses import dataclass, replace
from enum import IntEnum

import torch


class CodeFormat(IntEnum):
    """What a code holds; the values are the kernel's (csrc/linear_quantized.cpp)."""

    UINT4 = 0
    INT8 = 1
    FLOAT8_E4M3 = 2
    LEVELS4 = 3

    @property
    def bits(self) -> int:
        return 4 if self in (CodeFormat.UINT4, CodeFormat.LEVELS4) else 8


# Input features one block of codes covers; groups are whole blocks, or half a block (GGUF's
# Q6_K scales every 16).
CODE_BLOCK = 32
HALF_BLOCK = CODE_BLOCK // 2


@dataclass(frozen=True)
class QuantizedWeight:
    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None
    code_format: CodeFormat
    group_size: int
    # Column j multiplies input feature input_order[j] (int64 [K]); None: column j, feature j.
    input_order: torch.Tensor | None = None
    # LEVELS4's 16 values, float32; None for the other formats.
    levels: torch.Tensor | None = None
    # The codes, scales and offsets are in the CPU kernel's tile order (`with_tile_order`) rather
    # than the layout above.
    tile_order: bool = False

    def __post_init__(self) -> None:
        if (self.levels is not None) != (self.code_format is CodeFormat.LEVELS4):
            raise ValueError("levels go with, and only with, 4-bit level codes")
        if self.levels is not None and tuple(self.levels.shape) != (16,):
            raise ValueError(f"levels {tuple(self.levels.shape)} are not 16 values")
        if self.group_size != HALF_BLOCK and (self.group_size <= 0 or self.group_size % CODE_BLOCK):
            raise ValueError(
                f"group size {self.group_size} is neither {HALF_BLOCK} nor a multiple of "
                f"{CODE_BLOCK}"
            )
        expected = (self.out_features, self.in_features // self.group_size)
        for name, tensor in (("scales", self.scales), ("offsets", self.offsets)):
            if tensor is not None and tuple(tensor.shape) != expected:
                raise ValueError(f"{name} {tuple(tensor.shape)} do not match codes {expected}")
        if self.input_order is not None and tuple(self.input_order.shape) != (self.in_features,):
            raise ValueError(f"input order {tuple(self.input_order.shape)} does not match codes")

    @property
    def bits(self) -> int:
        return self.code_format.bits

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1] * 8 // self.bits

    @property
    def nbytes(self) -> int:
        tensors = (self.codes, self.scales, self.offsets, self.input_order, self.levels)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def with_tile_order(self, codes: torch.Tensor) -> "QuantizedWeight":
        """The weight with `codes`, which the compiled CPU ops regrouped into tile order, and its
        scales and offsets regrouped to match: [N / 16][groups][16 columns]."""

        def regrouped(values: torch.Tensor | None) -> torch.Tensor | None:
            if values is None:
                return None
            groups = values.view(self.out_features // 16, 16, -1).transpose(1, 2)
            return groups.contiguous().view(values.shape)

        return replace(
            self,
            codes=codes,
            scales=regrouped(self.scales),
            offsets=regrouped(self.offsets),
            tile_order=True,
        )

    def in_column_order(self) -> "QuantizedWeight":
        """The weight in the layout above: tile order undone (codes [N / 16][runs of 32
        features][4 words][16 columns][4 bytes], scales and offsets [N / 16][groups][16])."""
        if not self.tile_order:
            return self
        blocks = self.out_features // 16

        def ungrouped(values: torch.Tensor | None) -> torch.Tensor | None:
            if values is None:
                return None
            return values.view(blocks, -1, 16).transpose(1, 2).reshape(values.shape)

        codes = self.codes.view(blocks, -1, 4, 16, 4).permute(0, 3, 1, 2, 4)
        return replace(
            self,
            codes=codes.reshape(self.codes.shape),
            scales=ungrouped(self.scales),
            offsets=ungrouped(self.offsets),
            tile_order=False,
        )

    def _require_column_order(self) -> None:
        if self.tile_order:
            raise ValueError("a weight in the CPU kernel's tile order is sliced in column order")

    def rows(self, start: int, stop: int) -> "QuantizedWeight":
        """Output features [start, stop)."""
        self._require_column_order()
        return replace(
            self,
            codes=self.codes[start:stop],
            scales=self.scales[start:stop],
            offsets=None if self.offsets is None else self.offsets[start:stop],
        )

    def columns(self, start: int, stop: int) -> "QuantizedWeight":
        """Input features [start, stop): a row-parallel rank's slice, which must keep whole
        groups (see `splits_at`)."""
        if not self.splits_at(start, stop):
            raise ValueError(
                f"input features [{start}, {stop}) split a quantization group of "
                f"{self.group_size} consecutive features (or act-order groups)"
            )
        self._require_column_order()
        if self.group_size == self.in_features:
            # One group per output feature (per-channel scales): the slice keeps it.
            groups, group_size = slice(0, 1), stop - start
        else:
            groups, group_size = slice(start // self.group_size, stop // self.group_size), None
        return replace(
            self,
            codes=self.codes[:, start * self.bits // 8 : stop * self.bits // 8],
            scales=self.scales[:, groups],
            offsets=None if self.offsets is None else self.offsets[:, groups],
            group_size=group_size or self.group_size,
        )

    def splits_at(self, start: int, stop: int) -> bool:
        """Whether `columns(start, stop)` can slice it: its groups are runs of consecutive input
        features (not act-order's) and the slice cuts none, or one group spans every feature
        (either way, the slice is whole code blocks)."""
        if self.input_order is not None or start % CODE_BLOCK or stop % CODE_BLOCK:
            return False
        if self.group_size == self.in_features:
            return True
        return start % self.group_size == 0 and stop % self.group_size == 0

    def padded_rows(self, count: int) -> "QuantizedWeight":
        """`count` more output features of zeros (a padded vocabulary's last rank)."""
        if count == 0:
            return self
        self._require_column_order()

        def pad(tensor: torch.Tensor) -> torch.Tensor:
            return torch.cat([tensor, tensor.new_zeros(count, *tensor.shape[1:])])

        return replace(
            self,
            codes=pad(self.codes),
            scales=pad(self.scales),
            offsets=None if self.offsets is None else pad(self.offsets),
        )

    def contiguous(self) -> "QuantizedWeight":
        return replace(
            self,
            codes=self.codes.contiguous(),
            scales=self.scales.float().contiguous(),
            offsets=None if self.offsets is None else self.offsets.float().contiguous(),
            input_order=None if self.input_order is None else self.input_order.contiguous(),
            levels=None if self.levels is None else self.levels.float().contiguous(),
        )

    def to(self, device: torch.device) -> "QuantizedWeight":
        return replace(
            self,
            codes=self.codes.to(device),
            scales=self.scales.to(device),
            offsets=None if self.offsets is None else self.offsets.to(device),
            input_order=None if self.input_order is None else self.input_order.to(device),
            levels=None if self.levels is None else self.levels.to(device),
        )

    def unpacked_codes(self) -> torch.Tensor:
        """The integer codes [N, K]: 0..15 for 4 bits (LEVELS4's indexes too), -128..127 for
        INT8. (FP8 codes are floats: see `code_values`.)"""
        if self.tile_order:
            return self.in_column_order().unpacked_codes()
        if self.bits == 8:
            return self.codes.view(torch.int8).to(torch.int32)
        blocks = self.codes.view(self.out_features, -1, CODE_BLOCK // 2).to(torch.int32)
        return torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).reshape(self.out_features, -1)

    def code_values(self) -> torch.Tensor:
        """What each code stands for, float32 [N, K] (before its group's scale and offset)."""
        if self.code_format is CodeFormat.FLOAT8_E4M3:
            return self.codes.view(torch.float8_e4m3fn).float()
        codes = self.unpacked_codes()
        if self.levels is not None:
            return self.levels.float()[codes]
        return codes.float()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [N, K], computed in float32: the reference the kernel is tested against,
        and the matmul of devices the kernel does not run on."""
        if self.tile_order:
            return self.in_column_order().dequantize(dtype)
        groups = self.code_values().view(self.out_features, -1, self.group_size)
        weight = groups * self.scales.float()[..., None]
        if self.offsets is not None:
            weight = weight + self.offsets.float()[..., None]
        weight = weight.reshape(self.out_features, self.in_features)
        if self.input_order is not None:
            weight = torch.empty_like(weight).index_copy_(1, self.input_order, weight)
        return weight.to(dtype)


def concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Parts stacked along the output features (a fused q/k/v or gate/up projection)."""
    first = parts[0]
    if any(
        (p.code_format, p.group_size, p.offsets is None)
        != (first.code_format, first.group_size, first.offsets is None)
        or not _same_tensor(p.input_order, first.input_order)
        or not _same_tensor(p.levels, first.levels)
        for p in parts
    ):
        raise ValueError("the parts of a fused projection are quantized differently")
    for part in parts:
        part._require_column_order()
    return replace(
        first,
        codes=torch.cat([p.codes for p in parts]),
        scales=torch.cat([p.scales for p in parts]),
        offsets=None
        if first.offsets is None
        else torch.cat([p.offsets for p in parts if p.offsets is not None]),
    )


def _same_tensor(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is None and b is None or a is not None and b is not None and torch.equal(a, b)


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Integer codes 0..15 [N, K] into the kernel's 4-bit layout, uint8 [N, K / 2]."""
    rows = codes.shape[0]
    blocks = codes.to(torch.uint8).view(rows, -1, 2, CODE_BLOCK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(rows, -1)
