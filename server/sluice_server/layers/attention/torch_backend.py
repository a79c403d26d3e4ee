"""Reference attention backend in plain PyTorch; runs on any device and is what CPU serving uses.

K/V are read back by whole blocks (one contiguous copy per block rather than per token). Decodes
(chunks of one token) are batched: their blocks are gathered into a padded
[B, max_blocks * block_size, H_kv, D] tensor and attended in one call with a padding mask. Prefill
chunks are attended one sequence at a time with an explicit mask, causal within the chunk.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backend import AttentionBackend, AttentionMetadata, LayerKVCache, SequenceChunk


@dataclass
class DecodeGroup:
    """All one-token chunks of a step, attended together."""

    # Rows of those tokens in the flat batch, [B].
    token_rows: torch.Tensor
    # The blocks of each sequence's context, [B, max_blocks]; padded with block 0, masked out.
    block_tables: torch.Tensor
    # True where a gathered position is inside the sequence's context, [B, 1, 1, max_blocks * bs].
    key_mask: torch.Tensor


@dataclass
class PrefillGroup:
    """One multi-token chunk, attended on its own."""

    token_start: int
    token_end: int
    # The blocks of the sequence's context, [num_blocks].
    block_table: torch.Tensor
    # [query_len, num_blocks * bs]: a new token sees the cached prefix and the new tokens up to
    # itself, and nothing past the context.
    mask: torch.Tensor


@dataclass
class TorchAttentionMetadata(AttentionMetadata):
    decodes: DecodeGroup | None
    prefills: list[PrefillGroup]


def _gather_blocks(layer_cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[num_blocks, bs, H_kv, D] cache, [B, n] tables -> [B, n * bs, H_kv, D] contiguous copy."""
    # index_select over the flattened tables is several times faster than advanced indexing on CPU.
    gathered = layer_cache.index_select(0, block_tables.flatten())
    return gathered.view(block_tables.shape[0], -1, *layer_cache.shape[2:])


class TorchAttentionBackend(AttentionBackend):
    def build_metadata(
        self, chunks: Sequence[SequenceChunk], block_size: int, device: torch.device
    ) -> TorchAttentionMetadata:
        slot_mapping: list[int] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_context_lens: list[int] = []
        prefills: list[PrefillGroup] = []
        row = 0
        for chunk in chunks:
            blocks_needed = -(-chunk.context_len // block_size)
            if len(chunk.block_table) < blocks_needed:
                raise ValueError(
                    f"a chunk reaching {chunk.context_len} tokens needs {blocks_needed} blocks, "
                    f"its block table has {len(chunk.block_table)}"
                )
            table = list(chunk.block_table[:blocks_needed])
            slot_mapping.extend(
                table[p // block_size] * block_size + p % block_size
                for p in range(chunk.cache_len, chunk.context_len)
            )
            if chunk.query_len == 1:
                decode_rows.append(row)
                decode_tables.append(table)
                decode_context_lens.append(chunk.context_len)
            else:
                query_positions = torch.arange(chunk.cache_len, chunk.context_len, device=device)
                key_positions = torch.arange(blocks_needed * block_size, device=device)
                prefills.append(
                    PrefillGroup(
                        token_start=row,
                        token_end=row + chunk.query_len,
                        block_table=torch.tensor(table, dtype=torch.long, device=device),
                        mask=key_positions[None, :] <= query_positions[:, None],
                    )
                )
            row += chunk.query_len

        decodes = None
        if decode_rows:
            max_blocks = max(len(table) for table in decode_tables)
            padded_tables = [table + [0] * (max_blocks - len(table)) for table in decode_tables]
            context_lens = torch.tensor(decode_context_lens, device=device)
            key_positions = torch.arange(max_blocks * block_size, device=device)
            decodes = DecodeGroup(
                token_rows=torch.tensor(decode_rows, dtype=torch.long, device=device),
                block_tables=torch.tensor(padded_tables, dtype=torch.long, device=device),
                key_mask=(key_positions[None, :] < context_lens[:, None])[:, None, None, :],
            )
        return TorchAttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
            decodes=decodes,
            prefills=prefills,
        )

    def write(
        self,
        cache: LayerKVCache,
        key: torch.Tensor,
        value: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        num_kv_heads, head_dim = key.shape[1:]
        cache.key.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
        cache.value.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)

    def attend(
        self,
        query: torch.Tensor,
        cache: LayerKVCache,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        assert isinstance(metadata, TorchAttentionMetadata)
        num_heads, head_dim = query.shape[1:]
        num_kv_heads = cache.key.shape[2]
        output = torch.empty_like(query)

        decodes = metadata.decodes
        if decodes is not None:
            batch = decodes.token_rows.shape[0]
            # The query heads that share a KV head (grouped-query attention) stand in for the query
            # positions of a one-token decode, so one call covers every head without repeating K/V.
            grouped_query = query[decodes.token_rows].view(batch, num_kv_heads, -1, head_dim)
            keys = _gather_blocks(cache.key, decodes.block_tables).transpose(1, 2)
            values = _gather_blocks(cache.value, decodes.block_tables).transpose(1, 2)
            attended = F.scaled_dot_product_attention(
                grouped_query, keys, values, attn_mask=decodes.key_mask, scale=scale
            )
            output[decodes.token_rows] = attended.reshape(batch, num_heads, head_dim)

        for prefill in metadata.prefills:
            chunk_query = query[prefill.token_start : prefill.token_end].transpose(0, 1)[None]
            keys = _gather_blocks(cache.key, prefill.block_table[None]).transpose(1, 2)
            values = _gather_blocks(cache.value, prefill.block_table[None]).transpose(1, 2)
            attended = F.scaled_dot_product_attention(
                chunk_query, keys, values, attn_mask=prefill.mask, scale=scale, enable_gqa=True
            )
            output[prefill.token_start : prefill.token_end] = attended[0].transpose(0, 1)
        return output
