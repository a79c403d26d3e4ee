"""Token embedding table, filled from a checkpoint. Across tensor-parallel ranks each holds a
share of the vocabulary's rows (vocab-parallel): a rank embeds the tokens in its share, zeros
the others, and an all-reduce assembles the whole."""

import torch
import torch.nn.functional as F
from torch import nn

from ..weights import CheckpointWeights, copy_checked
from .runtime import LayerRuntime


class Embedding(nn.Module):
    """Looks tokens up; Gemma multiplies the result by sqrt(hidden_size) (`scale`), rounded to
    the model's dtype as transformers rounds it."""

    def __init__(
        self, vocab_size: int, hidden_size: int, runtime: LayerRuntime, scale: float | None = None
    ) -> None:
        super().__init__()
        self.shards = runtime.shards
        self.vocab = runtime.shards.padded(vocab_size)
        self.weight = nn.Parameter(
            torch.empty(self.vocab.size, hidden_size, dtype=runtime.dtype, device=runtime.device),
            requires_grad=False,
        )
        self.scale = (
            None
            if scale is None
            else torch.tensor(scale, dtype=runtime.dtype, device=runtime.device)
        )

    def load(self, weights: CheckpointWeights, name: str) -> None:
        weights.check_shape(name, (self.vocab.full, self.weight.shape[1]))
        stored = self.vocab.stored_size
        rows = weights.rows(name, self.vocab.start, self.vocab.start + stored)
        copy_checked(self.weight[:stored], rows, name)
        # The last rank's padding rows: never looked up, zero logits once gathered and cut off.
        self.weight[stored:].zero_()

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.shards.world_size == 1:
            embedded = F.embedding(token_ids, self.weight)
        else:
            local_ids = token_ids - self.vocab.start
            elsewhere = (local_ids < 0) | (local_ids >= self.vocab.size)
            embedded = F.embedding(local_ids.masked_fill(elsewhere, 0), self.weight)
            embedded = self.shards.all_reduce_(embedded.masked_fill(elsewhere[:, None], 0))
        return embedded if self.scale is None else embedded * self.scale
