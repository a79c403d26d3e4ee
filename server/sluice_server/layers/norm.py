"""RMSNorm, as used by the Llama family."""

import torch
from torch import nn

from .ops import Ops


class RMSNorm(nn.Module):
    def __init__(
        self, hidden_size: int, eps: float, ops: Ops, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.eps = eps
        self.ops = ops
        self.weight = nn.Parameter(
            torch.empty(hidden_size, dtype=dtype, device=device), requires_grad=False
        )

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """norm(hidden); with a residual stream, adds hidden into it first (in place) and
        returns norm(residual), as a pre-norm decoder does between its blocks."""
        if residual is None:
            return self.ops.rms_norm(hidden, self.weight, self.eps)
        return self.ops.add_rms_norm(hidden, residual, self.weight, self.eps)
