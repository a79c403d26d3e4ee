"""Token embedding table, filled from a checkpoint."""

import torch
import torch.nn.functional as F
from torch import nn

from .runtime import LayerRuntime


class Embedding(nn.Module):
    """Looks tokens up; Gemma multiplies the result by sqrt(hidden_size) (`scale`), rounded to
    the model's dtype as transformers rounds it."""

    def __init__(
        self, vocab_size: int, hidden_size: int, runtime: LayerRuntime, scale: float | None = None
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(vocab_size, hidden_size, dtype=runtime.dtype, device=runtime.device),
            requires_grad=False,
        )
        self.scale = (
            None
            if scale is None
            else torch.tensor(scale, dtype=runtime.dtype, device=runtime.device)
        )

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        embedded = F.embedding(token_ids, self.weight)
        return embedded if self.scale is None else embedded * self.scale
