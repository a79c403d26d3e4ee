"""A projection's weight held quantized: per output feature n and group g of `group_size`
consecutive input features, W[n, k] = scales[n, g] * code[n, k] + offsets[n, g] (no offsets:
symmetric codes).

GPTQ's act-order groups input features that are not consecutive; such a weight holds its columns
sorted by group, and `input_order` says which input feature each column multiplies (the kernel's
input is gathered in that order first).

The codes' layout is the one Sluice's CPU kernel reads (csrc/linear_quantized.cpp):

- 4 bits, unsigned 0..15: uint8 [N, K / 2], each 32 input features as 16 bytes whose low nibbles
  hold the first 16 and high nibbles the next 16 (GGUF's Q4 block layout);
- 8 bits, signed: int8 [N, K].

Every format Sluice loads (GGUF blocks, AWQ and GPTQ packing) is repacked into this one at load
time, so that one kernel serves them all.
"""

from dataclasses import dataclass, replace

import torch

# Input features one block of codes covers; groups are whole blocks.
CODE_BLOCK = 32


@dataclass(frozen=True)
class QuantizedWeight:
    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None
    bits: int
    group_size: int
    # Column j multiplies input feature input_order[j] (int64 [K]); None: column j, feature j.
    input_order: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"{self.bits}-bit codes are not supported (4 or 8)")
        if self.group_size <= 0 or self.group_size % CODE_BLOCK:
            raise ValueError(f"group size {self.group_size} is not a multiple of {CODE_BLOCK}")
        expected = (self.out_features, self.in_features // self.group_size)
        for name, tensor in (("scales", self.scales), ("offsets", self.offsets)):
            if tensor is not None and tuple(tensor.shape) != expected:
                raise ValueError(f"{name} {tuple(tensor.shape)} do not match codes {expected}")
        if self.input_order is not None and tuple(self.input_order.shape) != (self.in_features,):
            raise ValueError(f"input order {tuple(self.input_order.shape)} does not match codes")

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1] * 8 // self.bits

    @property
    def nbytes(self) -> int:
        tensors = (self.codes, self.scales, self.offsets, self.input_order)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def rows(self, start: int, stop: int) -> "QuantizedWeight":
        """Output features [start, stop)."""
        return replace(
            self,
            codes=self.codes[start:stop],
            scales=self.scales[start:stop],
            offsets=None if self.offsets is None else self.offsets[start:stop],
        )

    def columns(self, start: int, stop: int) -> "QuantizedWeight":
        """Input features [start, stop): a row-parallel rank's slice, which must hold whole
        groups (of consecutive features: see `splits_by_columns`)."""
        if self.input_order is not None:
            raise ValueError("act-order groups do not split by input features")
        if start % self.group_size or stop % self.group_size:
            raise ValueError(
                f"input features [{start}, {stop}) split a quantization group of "
                f"{self.group_size}; use a shard count that splits at group boundaries"
            )
        groups = slice(start // self.group_size, stop // self.group_size)
        return replace(
            self,
            codes=self.codes[:, start * self.bits // 8 : stop * self.bits // 8],
            scales=self.scales[:, groups],
            offsets=None if self.offsets is None else self.offsets[:, groups],
        )

    @property
    def splits_by_columns(self) -> bool:
        """Whether `columns` can slice it: its groups are runs of consecutive input features."""
        return self.input_order is None

    def padded_rows(self, count: int) -> "QuantizedWeight":
        """`count` more output features of zeros (a padded vocabulary's last rank)."""
        if count == 0:
            return self

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
        )

    def to(self, device: torch.device) -> "QuantizedWeight":
        return replace(
            self,
            codes=self.codes.to(device),
            scales=self.scales.to(device),
            offsets=None if self.offsets is None else self.offsets.to(device),
            input_order=None if self.input_order is None else self.input_order.to(device),
        )

    def unpacked_codes(self) -> torch.Tensor:
        """The codes as integers [N, K] (0..15 for 4 bits, -128..127 for 8)."""
        if self.bits == 8:
            return self.codes.view(torch.int8).to(torch.int32)
        blocks = self.codes.view(self.out_features, -1, CODE_BLOCK // 2).to(torch.int32)
        return torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).reshape(self.out_features, -1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [N, K], computed in float32: the reference the kernel is tested against,
        and the matmul of devices the kernel does not run on."""
        groups = self.unpacked_codes().view(self.out_features, -1, self.group_size).float()
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
        (p.bits, p.group_size, p.offsets is None)
        != (first.bits, first.group_size, first.offsets is None)
        or not _same_order(p.input_order, first.input_order)
        for p in parts
    ):
        raise ValueError("the parts of a fused projection are quantized differently")
    return replace(
        first,
        codes=torch.cat([p.codes for p in parts]),
        scales=torch.cat([p.scales for p in parts]),
        offsets=None
        if first.offsets is None
        else torch.cat([p.offsets for p in parts if p.offsets is not None]),
    )


def _same_order(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is None and b is None or a is not None and b is not None and torch.equal(a, b)


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Integer codes 0..15 [N, K] into the kernel's 4-bit layout, uint8 [N, K / 2]."""
    rows = codes.shape[0]
    blocks = codes.to(torch.uint8).view(rows, -1, 2, CODE_BLOCK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(rows, -1)
