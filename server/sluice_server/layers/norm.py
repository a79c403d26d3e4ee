"""RMSNorm, as used by the Llama family."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(
        self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(
            torch.empty(hidden_size, dtype=dtype, device=device), requires_grad=False
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # The variance is taken in float32 so that half-precision models keep their accuracy.
        hidden_f32 = hidden.float()
        variance = hidden_f32.pow(2).mean(dim=-1, keepdim=True)
        normalized = hidden_f32 * torch.rsqrt(variance + self.eps)
        return self.weight * normalized.to(hidden.dtype)
