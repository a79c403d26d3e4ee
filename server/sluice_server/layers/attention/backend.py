"""The interface every attention backend implements, and the paged KV cache it works on.

A flat batch holds the new tokens of several sequences back to back. Each sequence contributes a
chunk: `query_len` new tokens after `cache_len` tokens whose K/V are already in the cache (a decode
is a chunk of one token). A layer first writes the new tokens' K/V into their cache slots, then
attends: each new token sees the whole cached prefix and the new tokens up to itself (in a layer
with a sliding window, only the last `sliding_window` of those positions, itself included).
"""

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceChunk:
    """One sequence's share of a flat batch."""

    cache_len: int
    query_len: int
    # Block ids holding the sequence's tokens in order: token p is in block_table[p // block_size].
    block_table: Sequence[int]

    @property
    def context_len(self) -> int:
        """Tokens the sequence has in the cache once this chunk is written."""
        return self.cache_len + self.query_len

    def context_blocks(self, block_size: int) -> list[int]:
        """The blocks holding the context once this chunk is written; ValueError if the block
        table is too short."""
        blocks_needed = -(-self.context_len // block_size)
        if len(self.block_table) < blocks_needed:
            raise ValueError(
                f"a chunk reaching {self.context_len} tokens needs {blocks_needed} blocks, "
                f"its block table has {len(self.block_table)}"
            )
        return list(self.block_table[:blocks_needed])

    def new_slots(self, block_size: int) -> list[int]:
        """The cache slot of each of the chunk's new tokens."""
        table = self.block_table
        return [
            table[p // block_size] * block_size + p % block_size
            for p in range(self.cache_len, self.context_len)
        ]


@dataclass
class LayerKVCache:
    """One layer's K and V. Values are [num_kv_heads, num_blocks, block_size, head_dim]; keys
    the same, or [num_kv_heads, num_blocks, head_dim, block_size] for a backend whose
    `transposed_keys` is set, which then owns the layout within each block (the compiled CPU
    backend: pairs of dimensions, every key's two side by side, see kernels/csrc/attention.cpp).

    Slot s is token s % block_size of block s // block_size. Heads come first so that a batch's
    blocks, per head, line up each sequence's tokens back to back.

    An 8-bit float cache holds the keys divided by `key_scale` and the values by `value_scale`
    (a checkpoint's calibrated scales, 1 without them); any other holds them as they are.
    """

    key: torch.Tensor
    value: torch.Tensor
    key_scale: float = 1.0
    value_scale: float = 1.0

    @property
    def block_size(self) -> int:
        return self.value.shape[2]


@dataclass(frozen=True)
class AttentionParams:
    """How one layer attends; the same for every step."""

    scale: float
    # A query at position q sees keys at positions k with q - window < k <= q (the window counts the
    # query itself, as transformers' sliding_window does); None: the whole context.
    sliding_window: int | None = None
    # Scores become cap * tanh(scores / cap) before the softmax (Gemma 2); None: no capping.
    logit_softcap: float | None = None

    def __post_init__(self) -> None:
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"a sliding window must be at least 1, not {self.sliding_window}")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise ValueError(f"a logit soft cap must be positive, not {self.logit_softcap}")


@dataclass
class AttentionMetadata:
    """What a backend precomputes once per step and every layer reuses."""

    # Cache slot of each token of the flat batch, [T].
    slot_mapping: torch.Tensor


class AttentionBackend(ABC):
    # Whether this backend stores each key block transposed (see LayerKVCache).
    transposed_keys: bool = False

    @abstractmethod
    def build_metadata(
        self, chunks: Sequence[SequenceChunk], block_size: int, device: torch.device
    ) -> AttentionMetadata:
        """Precomputes slots, gather indices and masks for the flat batch of `chunks`, in order."""

    @abstractmethod
    def write(
        self,
        cache: LayerKVCache,
        key: torch.Tensor,
        value: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Stores the new tokens' key and value ([T, num_kv_heads, head_dim]) at their slots."""

    @abstractmethod
    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        cache: LayerKVCache,
        metadata: AttentionMetadata,
        params: AttentionParams,
    ) -> torch.Tensor:
        """Attention output [T, num_heads, head_dim] for query [T, num_heads, head_dim], as the
        layer's `params` say.

        `key` and `value` are the new tokens' own ([T, num_kv_heads, head_dim]), already written
        to the cache: a chunk that starts its sequence can attend to them without reading back.
        """
