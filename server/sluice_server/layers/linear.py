"""Linear layer whose weights are filled from a checkpoint rather than initialised.

On CPU the weight is packed once after loading (`prepack_for_cpu`) by the layer's ops, for the
fastest matmul the CPU has (see `Ops.pack_linear`): Sluice's own bfloat16 matmul (AVX512-BF16),
or oneDNN's blocked layout. A plain `F.linear` repacks the weight on every call, which dominates
the small-batch matmuls of decoding (measured 2x slower in bfloat16 and 3x in float32 at 32 rows
than the oneDNN-packed weight); it remains for weights nothing packs: on GPUs, and bfloat16 on
CPUs oneDNN has no bfloat16 for.

Single-device for now; the column/row tensor-parallel variants will sit beside it.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..weights import CheckpointWeights, copy_checked
from .ops import PackedLinear
from .runtime import LayerRuntime


class Linear(nn.Module):
    """y = x W^T + b, with W of shape [out_features, in_features] as in checkpoints."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        runtime: LayerRuntime,
    ) -> None:
        super().__init__()
        self.ops = runtime.ops
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
        """Fills the weight (and bias) from the checkpoint's projections `names` (without their
        `.weight`), stacked along the output dim when there are several."""
        copy_checked(
            self.weight,
            weights.concatenated([f"{name}.weight" for name in names]),
            " + ".join(names),
        )
        if self.bias is not None:
            copy_checked(
                self.bias,
                weights.concatenated([f"{name}.bias" for name in names]),
                " + ".join(f"{name}.bias" for name in names),
            )

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
