"""Reference attention backend in plain PyTorch; runs on any device.

Decodes (chunks of one token) are batched: their blocks are gathered into a padded
[H_kv, B, max_blocks * block_size, D] tensor and attended with two batched matmuls and a padding
mask. Chunks that start their sequence (no cached prefix) need nothing from the cache: those of
equal length are stacked and attended in one causal scaled_dot_product_attention call on their
own keys and values. A chunk that continues a cached prefix reads its context back by whole
blocks and is attended on its own, with a mask.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backend import AttentionBackend, AttentionMetadata, AttentionParams, LayerKVCache, SequenceChunk


@dataclass
class DecodeGroup:
    """All one-token chunks of a step, attended together."""

    # Rows of those tokens in the flat batch, [B].
    token_rows: torch.Tensor
    # The blocks of each sequence's context, [B, max_blocks]; padded with block 0.
    block_tables: torch.Tensor
    # True where a gathered position is past the sequence's context, [1, B, 1, max_blocks * bs].
    padding_mask: torch.Tensor


@dataclass
class FreshPrefillGroup:
    """Chunks of equal length that start their sequences, attended together."""

    # Rows of their tokens in the flat batch, sequence after sequence, [num_sequences * length].
    token_rows: torch.Tensor
    num_sequences: int
    length: int


@dataclass
class CachedPrefill:
    """A multi-token chunk after a cached prefix, attended on its own."""

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
    fresh_prefills: list[FreshPrefillGroup]
    cached_prefills: list[CachedPrefill]

    @property
    def decodes_only(self) -> bool:
        return not self.fresh_prefills and not self.cached_prefills


def _gather_blocks(layer_cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[H_kv, num_blocks, bs, D] cache, [B, n] tables -> [H_kv, B, n * bs, D] contiguous copy."""
    num_kv_heads, num_blocks, block_size, head_dim = layer_cache.shape
    # One index_select over dim 0 of a [H_kv * num_blocks, bs, D] view: several times faster on
    # CPU than selecting along dim 1 or advanced indexing.
    head_offsets = torch.arange(num_kv_heads, device=block_tables.device)[:, None] * num_blocks
    rows = (head_offsets + block_tables.flatten()[None, :]).flatten()
    gathered = layer_cache.view(-1, block_size, head_dim).index_select(0, rows)
    return gathered.view(num_kv_heads, block_tables.shape[0], -1, head_dim)


class TorchAttentionBackend(AttentionBackend):
    def build_metadata(
        self, chunks: Sequence[SequenceChunk], block_size: int, device: torch.device
    ) -> TorchAttentionMetadata:
        slot_mapping: list[int] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_context_lens: list[int] = []
        fresh_rows_by_length: dict[int, list[int]] = {}
        cached_prefills: list[CachedPrefill] = []
        row = 0
        for chunk in chunks:
            table = chunk.context_blocks(block_size)
            slot_mapping.extend(chunk.new_slots(block_size))
            if chunk.query_len == 1:
                decode_rows.append(row)
                decode_tables.append(table)
                decode_context_lens.append(chunk.context_len)
            elif chunk.cache_len == 0:
                fresh_rows_by_length.setdefault(chunk.query_len, []).extend(
                    range(row, row + chunk.query_len)
                )
            else:
                query_positions = torch.arange(chunk.cache_len, chunk.context_len, device=device)
                key_positions = torch.arange(len(table) * block_size, device=device)
                cached_prefills.append(
                    CachedPrefill(
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
                padding_mask=(key_positions[None, :] >= context_lens[:, None])[None, :, None, :],
            )
        fresh_prefills = [
            FreshPrefillGroup(
                token_rows=torch.tensor(rows, dtype=torch.long, device=device),
                num_sequences=len(rows) // length,
                length=length,
            )
            for length, rows in fresh_rows_by_length.items()
        ]
        return TorchAttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
            decodes=decodes,
            fresh_prefills=fresh_prefills,
            cached_prefills=cached_prefills,
        )

    def write(
        self,
        cache: LayerKVCache,
        key: torch.Tensor,
        value: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        num_kv_heads, head_dim = key.shape[1:]
        cache.key.view(num_kv_heads, -1, head_dim).index_copy_(1, slot_mapping, key.transpose(0, 1))
        cache.value.view(num_kv_heads, -1, head_dim).index_copy_(
            1, slot_mapping, value.transpose(0, 1)
        )

    def _attend_decodes(
        self, query: torch.Tensor, cache: LayerKVCache, decodes: DecodeGroup, scale: float
    ) -> torch.Tensor:
        """[B, num_heads, head_dim] for the decodes' queries [B, num_heads, head_dim]."""
        batch, num_heads, head_dim = query.shape
        num_kv_heads = cache.key.shape[0]
        # The query heads that share a KV head (grouped-query attention) stand in for the query
        # positions of a one-token decode, so one matmul covers every head without repeating
        # K/V: [H_kv, B, group, D] against [H_kv, B, context, D].
        grouped_query = (query * scale).view(batch, num_kv_heads, -1, head_dim)
        keys = _gather_blocks(cache.key, decodes.block_tables)
        values = _gather_blocks(cache.value, decodes.block_tables)
        # Plain matmuls beat scaled_dot_product_attention on CPU for one-token queries (it is
        # built for long queries). The softmax accumulates in float32 internally.
        scores = torch.matmul(grouped_query.transpose(0, 1), keys.transpose(-1, -2))
        scores.masked_fill_(decodes.padding_mask, float("-inf"))
        probabilities = torch.softmax(scores, dim=-1)
        attended = torch.matmul(probabilities, values).transpose(0, 1)
        return attended.reshape(batch, num_heads, head_dim)

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        cache: LayerKVCache,
        metadata: AttentionMetadata,
        params: AttentionParams,
    ) -> torch.Tensor:
        scale = params.scale
        assert isinstance(metadata, TorchAttentionMetadata)
        decodes = metadata.decodes
        if decodes is not None and metadata.decodes_only:
            # The common step: no gather and scatter of rows.
            return self._attend_decodes(query, cache, decodes, scale)

        output = torch.empty_like(query)
        if decodes is not None:
            output[decodes.token_rows] = self._attend_decodes(
                query[decodes.token_rows], cache, decodes, scale
            )
        for group in metadata.fresh_prefills:
            attended = F.scaled_dot_product_attention(
                _stack_sequences(query, group),
                _stack_sequences(key, group),
                _stack_sequences(value, group),
                is_causal=True,
                scale=scale,
                enable_gqa=True,
            )
            output[group.token_rows] = attended.transpose(1, 2).flatten(0, 1)
        for prefill in metadata.cached_prefills:
            chunk_query = query[prefill.token_start : prefill.token_end].transpose(0, 1)[None]
            keys = _gather_blocks(cache.key, prefill.block_table[None]).transpose(0, 1)
            values = _gather_blocks(cache.value, prefill.block_table[None]).transpose(0, 1)
            attended = F.scaled_dot_product_attention(
                chunk_query, keys, values, attn_mask=prefill.mask, scale=scale, enable_gqa=True
            )
            output[prefill.token_start : prefill.token_end] = attended[0].transpose(0, 1)
        return output


def _stack_sequences(rows: torch.Tensor, group: FreshPrefillGroup) -> torch.Tensor:
    """[T, heads, D] flat rows -> [num_sequences, heads, length, D] for the group's chunks."""
    selected = rows[group.token_rows].view(group.num_sequences, group.length, *rows.shape[1:])
    return selected.transpose(1, 2)
