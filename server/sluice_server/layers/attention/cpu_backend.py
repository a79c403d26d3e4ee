"""Attention on CPU with Sluice's C++ kernels: one kernel call per layer attends every chunk of
the step, decodes and prompt chunks alike, reading K/V in place from the paged cache (with a
sliding window, only the blocks in the window).

Keys are stored with each block transposed, in pairs of dimensions ([D / 2, block_size, 2]),
which lets the kernel score a block with vector multiply-adds, or bfloat16 dot-product
instructions where the CPU has them (see kernels/csrc/attention.cpp).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import torch

from .backend import (
    AttentionBackend,
    AttentionMetadata,
    AttentionParams,
    LayerKVCache,
    SequenceChunk,
)


@dataclass
class CompiledCpuAttentionMetadata(AttentionMetadata):
    # Each chunk's blocks, [S, max_blocks] int32, padded with block 0.
    block_tables: torch.Tensor
    # Tokens each chunk's sequence had cached before it, [S] int32.
    cache_lens: torch.Tensor
    # Where each chunk's rows start in the flat batch, and the end, [S + 1] int32.
    query_starts: torch.Tensor


class CompiledCpuAttentionBackend(AttentionBackend):
    transposed_keys = True

    def __init__(self, kernels: ModuleType) -> None:
        self.kernels = kernels

    def build_metadata(
        self, chunks: Sequence[SequenceChunk], block_size: int, device: torch.device
    ) -> CompiledCpuAttentionMetadata:
        slot_mapping: list[int] = []
        tables: list[list[int]] = []
        query_starts = [0]
        for chunk in chunks:
            table = chunk.context_blocks(block_size)
            slot_mapping.extend(chunk.new_slots(block_size))
            tables.append(table)
            query_starts.append(query_starts[-1] + chunk.query_len)
        width = max((len(table) for table in tables), default=0)
        return CompiledCpuAttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
            block_tables=torch.tensor(
                [table + [0] * (width - len(table)) for table in tables],
                dtype=torch.int32,
                device=device,
            ).view(len(tables), width),
            cache_lens=torch.tensor(
                [chunk.cache_len for chunk in chunks], dtype=torch.int32, device=device
            ),
            query_starts=torch.tensor(query_starts, dtype=torch.int32, device=device),
        )

    def write(
        self,
        cache: LayerKVCache,
        key: torch.Tensor,
        value: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        self.kernels.write_kv(
            cache.key, cache.value, key, value, slot_mapping, cache.key_scale, cache.value_scale
        )

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        cache: LayerKVCache,
        metadata: AttentionMetadata,
        params: AttentionParams,
    ) -> torch.Tensor:
        assert isinstance(metadata, CompiledCpuAttentionMetadata)
        return self.kernels.paged_attention(
            query,
            cache.key,
            cache.value,
            metadata.block_tables,
            metadata.cache_lens,
            metadata.query_starts,
            params.scale,
            # The kernel's 0: no window, no cap.
            params.sliding_window or 0,
            params.logit_softcap or 0.0,
            cache.key_scale,
            cache.value_scale,
        )
