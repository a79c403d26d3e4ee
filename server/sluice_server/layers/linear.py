"""Linear layers whose weights are filled from a checkpoint rather than initialised, each holding
its rank's slice (see tensor_parallel.py): column-parallel (a slice of the output features),
row-parallel (a slice of the input features, partial outputs summed across ranks) and replicated.

On CPU the weight is packed once after loading (`prepack_for_cpu`) by the layer's ops, for the
fastest matmul the CPU has (see `Ops.pack_linear`): Sluice's own bfloat16 matmul (AVX512-BF16
or AVX2) or float32 matmul (AVX2 without AVX-512), or oneDNN's blocked layout. A plain `F.linear`
repacks the weight on every call, which dominates the small-batch matmuls of decoding (measured
2x slower in bfloat16 and 3x in float32 at 32 rows than the oneDNN-packed weight); it remains for
weights nothing packs: on GPUs, and bfloat16 on CPUs oneDNN has no bfloat16 for.

A checkpoint that holds a projection quantized (see sluice_server.quant) loads it as it is
(`quantized`) instead of the weight, and the ops multiply by it directly.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import QuantizedWeight, concat_rows
from ..weights import CheckpointWeights, copy_checked
from .ops import PackedLinear
from .runtime import LayerRuntime
from .tensor_parallel import Section


class Linear(nn.Module):
    """y = x W^T + b over this rank's weight, W of shape [out_features, in_features] as in
    checkpoints. The subclasses say which slice that is and how it loads."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        runtime: LayerRuntime,
    ) -> None:
        super().__init__()
        self.ops = runtime.ops
        self.shards = runtime.shards
        dtype, device = runtime.dtype, runtime.device
        # torch.empty: random initialisation would be wasted work, the checkpoint overwrites it.
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

        # The weight (and bias) as the ops packed them, once `prepack_for_cpu` ran; None: the
        # checkpoint's layout through F.linear.
        self.packed: PackedLinear | None = None
        # The weight as the checkpoint quantized it, in place of `weight`; None: not quantized.
        self.quantized: QuantizedWeight | None = None

    def load(self, weights: CheckpointWeights, names: list[str]) -> None:
        raise NotImplementedError

    def _hold_quantized(self, weight: QuantizedWeight) -> None:
        """Serves `weight` in place of the (never filled) unquantized one. Its tensors are
        registered as buffers, so that the model's memory counts them."""
        expected = (self.weight.shape[0], self.weight.shape[1])
        if (weight.out_features, weight.in_features) != expected:
            raise ValueError(
                f"quantized weight [{weight.out_features}, {weight.in_features}], model expects "
                f"{list(expected)}"
            )
        self.quantized = weight.contiguous().to(self.weight.device)
        self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)
        self._register_quantized(self.quantized)

    def _register_quantized(self, weight: QuantizedWeight) -> None:
        held = {
            "codes": weight.codes,
            "scales": weight.scales,
            "offsets": weight.offsets,
            "input_order": weight.input_order,
            "levels": weight.levels,
        }
        for name, tensor in held.items():
            if tensor is not None:
                self.register_buffer(f"quantized_{name}", tensor)

    def prepack_for_cpu(self, release_weight: bool) -> None:
        """Packs the weight for the CPU's matmul where the ops have one for its dtype;
        `release_weight` then frees the checkpoint layout (unless another module shares it, e.g.
        tied embeddings). A quantized weight is already in its kernel's layout, which the ops
        may regroup for the CPU's instructions (`Ops.prepare_quantized`)."""
        if self.quantized is not None:
            self.quantized = self.ops.prepare_quantized(self.quantized, self.weight.dtype)
            self._register_quantized(self.quantized)
            return
        self.packed = self.ops.pack_linear(self.weight, self.bias)
        if self.packed is not None and release_weight:
            self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            return self.ops.quantized_linear(x, self.quantized, self.bias)
        if self.packed is not None:
            return self.ops.packed_linear(x, self.packed)
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(Linear):
    """Holds this rank's share of each of `sections` of the output features, side by side: a
    fused projection (q/k/v, gate/up) keeps each of its parts' share, so that every rank's output
    splits into the same parts. No communication: the next layer reads the slice as it is."""

    def __init__(
        self,
        in_features: int,
        sections: Sequence[Section],
        bias: bool,
        runtime: LayerRuntime,
    ) -> None:
        super().__init__(in_features, sum(section.size for section in sections), bias, runtime)
        self.sections = tuple(sections)

    def load(self, weights: CheckpointWeights, names: list[str]) -> None:
        """Fills the weight (and bias) from the checkpoint's projections `names` (without their
        `.weight`): one per section, or one fused tensor holding all the sections in order."""
        quantized = self._quantized_rows(weights, names)
        if quantized is not None:
            self._hold_quantized(quantized)
        else:
            self._fill(self.weight, weights, names, "weight")
        if self.bias is not None:
            self._fill(self.bias, weights, names, "bias")

    def _quantized_rows(
        self, weights: CheckpointWeights, names: list[str]
    ) -> QuantizedWeight | None:
        """This rank's sections of the checkpoint's quantized projections, or None where they
        are not all quantized alike (those load unquantized)."""
        found = [weights.quantized(f"{name}.weight") for name in names]
        parts = [part for part in found if part is not None]
        if len(parts) < len(names):
            return None
        sources = self._section_sources(names)
        fulls = [section.full for section in self.sections]
        expected = [sum(fulls)] if len(parts) == 1 else fulls
        if [part.out_features for part in parts] != expected:
            raise ValueError(f"{' + '.join(names)}: quantized shape does not match the model")
        slices = []
        for (index, offset), section in zip(sources, self.sections, strict=True):
            start = offset + section.start
            stored = parts[index].rows(start, start + section.stored_size)
            slices.append(stored.padded_rows(section.size - section.stored_size))
        try:
            return concat_rows(slices)
        except ValueError:
            return None

    def _section_sources(self, names: list[str]) -> list[tuple[int, int]]:
        """Per section: which of `names` holds it, and the row where it starts there."""
        fulls = [section.full for section in self.sections]
        if len(names) == len(self.sections):
            return [(index, 0) for index in range(len(names))]
        if len(names) == 1:
            return [(0, sum(fulls[:index])) for index in range(len(fulls))]
        raise ValueError(f"{' + '.join(names)}: {len(self.sections)} parts expected")

    def _fill(
        self, parameter: torch.Tensor, weights: CheckpointWeights, names: list[str], suffix: str
    ) -> None:
        tensor_names = [f"{name}.{suffix}" for name in names]
        features = parameter.shape[1:]
        fulls = [section.full for section in self.sections]
        expected = [sum(fulls)] if len(names) == 1 else fulls
        sources = [(tensor_names[index], offset) for index, offset in self._section_sources(names)]
        for name, full in zip(tensor_names, expected, strict=True):
            weights.check_shape(name, (full, *features))
        row = 0
        for (name, offset), section in zip(sources, self.sections, strict=True):
            start, stored = offset + section.start, section.stored_size
            rows = weights.rows(name, start, start + stored)
            copy_checked(parameter[row : row + stored], rows, name)
            # Padding past the end of the dimension (the vocabulary's last rank) computes zeros.
            parameter[row + stored : row + section.size].zero_()
            row += section.size


class ReplicatedLinear(ColumnParallelLinear):
    """The whole projection on every rank: layers too small to split (a mixture of experts'
    router)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, runtime: LayerRuntime
    ) -> None:
        super().__init__(in_features, [Section.whole(out_features)], bias, runtime)


class RowParallelLinear(Linear):
    """Holds this rank's `in_section` of the input features: its output is this rank's partial
    sum of the full output, and the ranks' partials are summed with an all-reduce (`reduce`),
    or left for the caller to sum once over several such layers (a mixture of experts). The bias
    joins on rank 0 only, so that it is counted once in the sum."""

    def __init__(
        self,
        in_section: Section,
        out_features: int,
        bias: bool,
        runtime: LayerRuntime,
        reduce: bool = True,
    ) -> None:
        super().__init__(in_section.size, out_features, bias and runtime.shards.is_first, runtime)
        self.in_section = in_section
        self.reduce = reduce

    def load(self, weights: CheckpointWeights, names: list[str]) -> None:
        (name,) = names
        quantized = weights.quantized(f"{name}.weight")
        start, stop = self.in_section.start, self.in_section.stop
        if quantized is not None and quantized.in_features != self.in_section.full:
            raise ValueError(f"{name}.weight: quantized shape does not match the model")
        if quantized is not None and (self.in_section.is_whole or quantized.splits_at(start, stop)):
            if not self.in_section.is_whole:
                quantized = quantized.columns(start, stop)
            self._hold_quantized(quantized)
            if self.bias is not None:
                copy_checked(self.bias, weights.get(f"{name}.bias"), f"{name}.bias")
            return
        # Unquantized, or quantized in groups a rank's slice of the input features would cut
        # (GPTQ's act-order, or groups wider than the slice's share): `columns` gives it
        # dequantized (or as stored, where the quantization is done at load).
        weights.check_shape(f"{name}.weight", (self.weight.shape[0], self.in_section.full))
        columns = weights.columns(f"{name}.weight", start, stop)
        copy_checked(self.weight, columns, f"{name}.weight")
        if self.bias is not None:
            copy_checked(self.bias, weights.get(f"{name}.bias"), f"{name}.bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = super().forward(x)
        return self.shards.all_reduce_(partial) if self.reduce else partial
