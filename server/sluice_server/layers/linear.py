"""Linear layer whose weights are filled from a checkpoint rather than initialised.

On CPU the weight is packed once after loading (`prepack_for_cpu`): for Sluice's own bfloat16
matmul where the ops have one (CPUs with AVX512-BF16), otherwise into oneDNN's blocked layout. A
plain `F.linear` repacks it on every call, which dominates the small-batch matmuls of decoding
(measured 2x slower in bfloat16 and 3x in float32 at 32 rows than the oneDNN-packed weight).

Single-device for now; the column/row tensor-parallel variants will sit beside it.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .ops import Ops, PackedLinear


class Linear(nn.Module):
    """y = x W^T + b, with W of shape [out_features, in_features] as in checkpoints."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        ops: Ops,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.ops = ops
        # torch.empty: random initialisation would be wasted work, the checkpoint overwrites it.
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

        # Once `prepack_for_cpu` ran: the weight packed for the ops' own matmul, or else the
        # oneDNN-packed weight.
        self.packed: PackedLinear | None = None
        self.packed_weight: torch.Tensor | None = None

    def prepack_for_cpu(self, release_weight: bool, batch_hint: int = 32) -> None:
        """Packs the weight for the ops' matmul, or for oneDNN where they have none for it;
        `release_weight` frees the checkpoint layout (unless another module shares it, e.g. tied
        embeddings)."""
        if self.weight.device.type != "cpu":
            return
        self.packed = self.ops.pack_linear(self.weight, self.bias)
        if self.packed is None:
            if not torch.backends.mkldnn.is_available():
                return  # F.linear on the checkpoint's layout
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight, batch_hint)
        if release_weight:
            self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.ops.packed_linear(x, self.packed)
        if self.packed_weight is not None:
            return torch.ops.mkldnn._linear_pointwise(
                x, self.packed_weight, self.bias, "none", [], ""
            )
        return F.linear(x, self.weight, self.bias)
