"""Linear layers whose weights are filled from a checkpoint rather than initialised, each holding
its rank's slice (see tensor_parallel.py): column-parallel (a slice of the output features),
row-parallel (a slice of the input features, partial outputs summed across ranks) and replicated.

On CPU the weight is packed once after loading (`prepack_for_cpu`) by the layer's ops, for the
fastest matmul the CPU has (see `Ops.pack_linear`): Sluice's own bfloat16 matmul (AVX512-BF16),
or oneDNN's blocked layout. A plain `F.linear` repacks the weight on every call, which dominates
the small-batch matmuls of decoding (measured 2x slower in bfloat16 and 3x in float32 at 32 rows
than the oneDNN-packed weight); it remains for weights nothing packs: on GPUs, and bfloat16 on
CPUs oneDNN has no bfloat16 for.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

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

    def load(self, weights: CheckpointWeights, names: list[str]) -> None:
        raise NotImplementedError

    def prepack_for_cpu(self, release_weight: bool) -> None:
        """Packs the weight for the CPU's matmul where the ops have one for its dtype;
        `release_weight` then frees the checkpoint layout (unless another module shares it, e.g.
        tied embeddings)."""
        self.packed = self.ops.pack_linear(self.weight, self.bias)
        if self.packed is not None and release_weight:
            self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        self._fill(self.weight, weights, names, "weight")
        if self.bias is not None:
            self._fill(self.bias, weights, names, "bias")

    def _fill(
        self, parameter: torch.Tensor, weights: CheckpointWeights, names: list[str], suffix: str
    ) -> None:
        tensor_names = [f"{name}.{suffix}" for name in names]
        features = parameter.shape[1:]
        fulls = [section.full for section in self.sections]
        # Per section: the tensor it is in, and the row where it starts there.
        if len(names) == len(self.sections):
            for name, full in zip(tensor_names, fulls, strict=True):
                weights.check_shape(name, (full, *features))
            sources = list(zip(tensor_names, [0] * len(fulls), strict=True))
        elif len(names) == 1:
            weights.check_shape(tensor_names[0], (sum(fulls), *features))
            offsets = [sum(fulls[:index]) for index in range(len(fulls))]
            sources = [(tensor_names[0], offset) for offset in offsets]
        else:
            raise ValueError(f"{' + '.join(tensor_names)}: {len(self.sections)} parts expected")
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
        weights.check_shape(f"{name}.weight", (self.weight.shape[0], self.in_section.full))
        columns = weights.columns(f"{name}.weight", self.in_section.start, self.in_section.stop)
        copy_checked(self.weight, columns, f"{name}.weight")
        if self.bias is not None:
            copy_checked(self.bias, weights.get(f"{name}.bias"), f"{name}.bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = super().forward(x)
        return self.shards.all_reduce_(partial) if self.reduce else partial

