"""RMSNorm, as decoders use it before and (Gemma) after their blocks."""

import torch
from torch import nn

from .runtime import LayerRuntime


class RMSNorm(nn.Module):
    """x / rms(x) * w. Gemma checkpoints store w - 1 (`weight_offset` 1.0): the offset is added
    once at load, so every norm runs the same kernel."""

    def __init__(
        self,
        hidden_size: int,
        eps: float,
        runtime: LayerRuntime,
        weight_offset: float = 0.0,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.ops = runtime.ops
        self.weight_offset = weight_offset
        self.weight = nn.Parameter(
            torch.empty(hidden_size, dtype=runtime.dtype, device=runtime.device),
            requires_grad=False,
        )

    def load(self, checkpoint_weight: torch.Tensor) -> None:
        if checkpoint_weight.shape != self.weight.shape:
            raise ValueError(
                f"norm weight: checkpoint shape {tuple(checkpoint_weight.shape)}, "
                f"model expects {tuple(self.weight.shape)}"
            )
        # The offset is added in float32, as Gemma adds it before multiplying.
        self.weight.copy_(checkpoint_weight.float() + self.weight_offset)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """norm(hidden); with a residual stream, adds hidden into it first (in place) and
        returns norm(residual), as a pre-norm decoder does between its blocks."""
        if residual is None:
            return self.ops.rms_norm(hidden, self.weight, self.eps)
        return self.ops.add_rms_norm(hidden, residual, self.weight, self.eps)
