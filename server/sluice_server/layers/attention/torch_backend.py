"""Reference attention backend in plain PyTorch; runs on any device.

Decodes (chunks of one token) are batched: their blocks are gathered into a padded
[H_kv, B, max_blocks * block_size, D] tensor and attended with two batched matmuls and a padding
mask. Chunks that start their sequence (no cached prefix) need nothing from the cache: those of
equal length are stacked and attended in one causal scaled_dot_product_attention call on their
own keys and values. A chunk that continues a cached prefix reads its context back by whole
blocks and is attended on its own, with a mask.

In a layer with a sliding window, decodes and cached prefills gather only the blocks from the one
holding the first position their window reaches, and a mask hides what the window leaves out of
those (and of a fresh prefill longer than the window). The step's metadata builds these blocks and
masks for a window when the first layer with that window asks, and keeps them for the others. A
soft cap on the scores, which scaled_dot_product_attention cannot apply, makes each path an
explicit matmul and softmax in float32.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from .backend import (
    AttentionBackend,
    AttentionMetadata,
    AttentionParams,
    LayerKVCache,
    SequenceChunk,
)


def _seen_window(window: int | None, longest_context: int) -> int | None:
    """The window as the masks need it: None where it covers every position of the contexts."""
    return None if window is None or window >= longest_context else window


def _first_seen_block(position: int, window: int | None, block_size: int) -> int:
    """The block holding the first position a query at `position` sees."""
    first_position = 0 if window is None else max(0, position - window + 1)
    return first_position // block_size


def _visible(
    query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None
) -> torch.Tensor:
    """[..., Lq, Lk]: whether a query at each of query_positions [..., Lq] sees a key at each of
    key_positions [..., Lk]."""
    queries, keys = query_positions[..., :, None], key_positions[..., None, :]
    visible = keys <= queries
    if window is not None:
        visible &= keys > queries - window
    return visible


@dataclass(frozen=True)
class GatheredContext:
    """The cache blocks some queries read back, and which gathered positions they see."""

    # The blocks of each sequence's context that its queries' windows reach, [B, n]; padded with
    # block 0.
    block_tables: torch.Tensor
    # Whether each query sees each gathered position, [B, Lq, n * block_size].
    visible: torch.Tensor


def _gather_context(
    tables: Sequence[Sequence[int]],
    query_positions: Sequence[range],
    window: int | None,
    block_size: int,
    device: torch.device,
) -> GatheredContext:
    """The blocks and masks for sequences with block tables `tables`, each with queries at
    `query_positions` (all sequences the same number of them)."""
    first_blocks = [
        _first_seen_block(positions[0], window, block_size) for positions in query_positions
    ]
    seen_tables = [table[first:] for table, first in zip(tables, first_blocks, strict=True)]
    width = max(len(table) for table in seen_tables)
    padded_tables = [list(table) + [0] * (width - len(table)) for table in seen_tables]
    key_positions = (
        torch.tensor(first_blocks, device=device)[:, None] * block_size
        + torch.arange(width * block_size, device=device)[None, :]
    )
    queries = torch.tensor([list(positions) for positions in query_positions], device=device)
    return GatheredContext(
        block_tables=torch.tensor(padded_tables, dtype=torch.long, device=device),
        visible=_visible(queries, key_positions, window),
    )


@dataclass
class DecodeGroup:
    """All one-token chunks of a step, attended together."""

    # Rows of those tokens in the flat batch, [B].
    token_rows: torch.Tensor
    # Each sequence's context: its blocks and its length.
    tables: list[list[int]]
    context_lens: list[int]
    block_size: int
    # By window (None: the whole context): the blocks to gather, and True where a gathered
    # position is outside the sequence's window or past its context, [1, B, 1, n * block_size].
    _contexts: dict[int | None, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def context(self, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        window = _seen_window(window, max(self.context_lens))
        if window not in self._contexts:
            gathered = _gather_context(
                self.tables,
                [range(length - 1, length) for length in self.context_lens],
                window,
                self.block_size,
                self.token_rows.device,
            )
            hidden = ~gathered.visible.transpose(0, 1)[:, :, None, :]
            self._contexts[window] = (gathered.block_tables, hidden)
        return self._contexts[window]


@dataclass
class FreshPrefillGroup:
    """Chunks of equal length that start their sequences, attended together."""

    # Rows of their tokens in the flat batch, sequence after sequence, [num_sequences * length].
    token_rows: torch.Tensor
    num_sequences: int
    length: int
    # By window (None: causal): which earlier tokens each token sees, [length, length].
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def visible(self, window: int | None) -> torch.Tensor:
        window = _seen_window(window, self.length)
        if window not in self._masks:
            positions = torch.arange(self.length, device=self.token_rows.device)
            self._masks[window] = _visible(positions, positions, window)
        return self._masks[window]


@dataclass
class CachedPrefill:
    """A multi-token chunk after a cached prefix, attended on its own."""

    token_start: int
    token_end: int
    cache_len: int
    # The blocks of the sequence's context.
    table: list[int]
    block_size: int
    device: torch.device
    # By window (None: the whole context): the blocks to gather, [1, n], and
    # [query_len, n * block_size]: a new token sees the cached prefix and the new tokens up to
    # itself, within its window, and nothing past the context.
    _contexts: dict[int | None, GatheredContext] = field(default_factory=dict)

    def context(self, window: int | None) -> GatheredContext:
        window = _seen_window(window, self.cache_len + self.token_end - self.token_start)
        if window not in self._contexts:
            positions = range(self.cache_len, self.cache_len + self.token_end - self.token_start)
            gathered = _gather_context(
                [self.table], [positions], window, self.block_size, self.device
            )
            self._contexts[window] = GatheredContext(gathered.block_tables, gathered.visible[0])
        return self._contexts[window]


@dataclass
class TorchAttentionMetadata(AttentionMetadata):
    decodes: DecodeGroup | None
    fresh_prefills: list[FreshPrefillGroup]
    cached_prefills: list[CachedPrefill]

    @property
    def decodes_only(self) -> bool:
        return not self.fresh_prefills and not self.cached_prefills


def _stored(rows: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """`rows` as a cache of `cache_dtype` holds them: an 8-bit float divided by `scale`, and
    saturated at its largest value rather than overflowing to NaN or infinity."""
    if rows.dtype == cache_dtype:
        return rows
    largest = torch.finfo(cache_dtype).max
    scaled = rows if scale == 1.0 else rows.float() / scale
    return scaled.clamp(-largest, largest).to(cache_dtype)


def _gather_blocks(
    layer_cache: torch.Tensor, block_tables: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """[H_kv, num_blocks, bs, D] cache, [B, n] tables -> [H_kv, B, n * bs, D] contiguous copy,
    in `dtype` (an 8-bit cache's widened to the queries')."""
    num_kv_heads, num_blocks, block_size, head_dim = layer_cache.shape
    # One index_select over dim 0 of a [H_kv * num_blocks, bs, D] view: several times faster on
    # CPU than selecting along dim 1 or advanced indexing.
    head_offsets = torch.arange(num_kv_heads, device=block_tables.device)[:, None] * num_blocks
    rows = (head_offsets + block_tables.flatten()[None, :]).flatten()
    gathered = layer_cache.view(-1, block_size, head_dim).index_select(0, rows)
    return gathered.view(num_kv_heads, block_tables.shape[0], -1, head_dim).to(dtype)


def _attend_in_float32(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    hidden: torch.Tensor,
    params: AttentionParams,
) -> torch.Tensor:
    """Attention as explicit matmuls and softmax in float32, the scores soft-capped where
    `params` say: query [N, H, Lq, D] against keys and values [N, H_kv, Lk, D], with `hidden`
    (True where a query does not see a key) broadcast to [N, H_kv, H / H_kv, Lq, Lk]. Returns
    [N, H, Lq, D] in the query's dtype."""
    batch, num_heads, query_len, head_dim = query.shape
    num_kv_heads = keys.shape[1]
    # Query heads that share a KV head side by side, as scaled_dot_product_attention's
    # enable_gqa pairs them: head h reads KV head h // group.
    grouped_query = query.float().reshape(batch, num_kv_heads, -1, query_len, head_dim)
    scores = torch.matmul(grouped_query, keys.float()[:, :, None].transpose(-1, -2))
    scores *= params.scale
    if params.logit_softcap is not None:
        scores = torch.tanh(scores / params.logit_softcap) * params.logit_softcap
    scores.masked_fill_(hidden, float("-inf"))
    probabilities = torch.softmax(scores, dim=-1)
    attended = torch.matmul(probabilities, values.float()[:, :, None])
    return attended.reshape(batch, num_heads, query_len, head_dim).to(query.dtype)


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
                cached_prefills.append(
                    CachedPrefill(
                        token_start=row,
                        token_end=row + chunk.query_len,
                        cache_len=chunk.cache_len,
                        table=table,
                        block_size=block_size,
                        device=device,
                    )
                )
            row += chunk.query_len

        decodes = None
        if decode_rows:
            decodes = DecodeGroup(
                token_rows=torch.tensor(decode_rows, dtype=torch.long, device=device),
                tables=decode_tables,
                context_lens=decode_context_lens,
                block_size=block_size,
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
        for rows, layer_cache, scale in (
            (key, cache.key, cache.key_scale),
            (value, cache.value, cache.value_scale),
        ):
            stored = _stored(rows, layer_cache.dtype, scale)
            if layer_cache.dtype.itemsize == 1:  # index_copy_ has no 8-bit float kernels
                layer_cache, stored = layer_cache.view(torch.uint8), stored.view(torch.uint8)
            layer_cache.view(num_kv_heads, -1, head_dim).index_copy_(
                1, slot_mapping, stored.transpose(0, 1)
            )

    def _attend_decodes(
        self,
        query: torch.Tensor,
        cache: LayerKVCache,
        decodes: DecodeGroup,
        params: AttentionParams,
    ) -> torch.Tensor:
        """[B, num_heads, head_dim] for the decodes' queries [B, num_heads, head_dim]."""
        batch, num_heads, head_dim = query.shape
        num_kv_heads = cache.key.shape[0]
        block_tables, hidden = decodes.context(params.sliding_window)
        keys = _gather_blocks(cache.key, block_tables, query.dtype)
        values = _gather_blocks(cache.value, block_tables, query.dtype)
        if params.logit_softcap is not None:
            attended = _attend_in_float32(
                query[:, :, None],
                keys.transpose(0, 1),
                values.transpose(0, 1),
                hidden.reshape(batch, 1, 1, 1, -1),
                params,
            )
            return attended[:, :, 0]
        # The query heads that share a KV head (grouped-query attention) stand in for the query
        # positions of a one-token decode, so one matmul covers every head without repeating
        # K/V: [H_kv, B, group, D] against [H_kv, B, context, D].
        grouped_query = (query * params.scale).view(batch, num_kv_heads, -1, head_dim)
        # Plain matmuls beat scaled_dot_product_attention on CPU for one-token queries (it is
        # built for long queries). The softmax accumulates in float32 internally.
        scores = torch.matmul(grouped_query.transpose(0, 1), keys.transpose(-1, -2))
        scores.masked_fill_(hidden, float("-inf"))
        probabilities = torch.softmax(scores, dim=-1)
        attended = torch.matmul(probabilities, values).transpose(0, 1)
        return attended.reshape(batch, num_heads, head_dim)

    def _attend_fresh(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        group: FreshPrefillGroup,
        params: AttentionParams,
    ) -> torch.Tensor:
        """[num_sequences * length, num_heads, head_dim] for the group's rows."""
        stacked = [_stack_sequences(rows, group) for rows in (query, key, value)]
        window = _seen_window(params.sliding_window, group.length)
        if params.logit_softcap is not None:
            attended = _attend_in_float32(*stacked, ~group.visible(window), params)
        elif window is None:
            attended = F.scaled_dot_product_attention(
                *stacked, is_causal=True, scale=params.scale, enable_gqa=True
            )
        else:
            attended = F.scaled_dot_product_attention(
                *stacked, attn_mask=group.visible(window), scale=params.scale, enable_gqa=True
            )
        return attended.transpose(1, 2).flatten(0, 1)

    def _attend_cached(
        self,
        query: torch.Tensor,
        cache: LayerKVCache,
        prefill: CachedPrefill,
        params: AttentionParams,
    ) -> torch.Tensor:
        """[query_len, num_heads, head_dim] for the chunk's rows."""
        context = prefill.context(params.sliding_window)
        chunk_query = query[prefill.token_start : prefill.token_end].transpose(0, 1)[None]
        keys = _gather_blocks(cache.key, context.block_tables, query.dtype).transpose(0, 1)
        values = _gather_blocks(cache.value, context.block_tables, query.dtype).transpose(0, 1)
        if params.logit_softcap is not None:
            attended = _attend_in_float32(chunk_query, keys, values, ~context.visible, params)
        else:
            attended = F.scaled_dot_product_attention(
                chunk_query,
                keys,
                values,
                attn_mask=context.visible,
                scale=params.scale,
                enable_gqa=True,
            )
        return attended[0].transpose(0, 1)

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        cache: LayerKVCache,
        metadata: AttentionMetadata,
        params: AttentionParams,
    ) -> torch.Tensor:
        assert isinstance(metadata, TorchAttentionMetadata)
        if cache.key_scale == 1.0 and cache.value_scale == 1.0:
            return self._attend_stored(query, key, value, cache, metadata, params)
        # Attending the stored keys and values, the scores take the keys' scale and the output the
        # values'.
        params = replace(params, scale=params.scale * cache.key_scale)
        attended = self._attend_stored(query, key, value, cache, metadata, params)
        return attended * cache.value_scale

    def _attend_stored(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        cache: LayerKVCache,
        metadata: TorchAttentionMetadata,
        params: AttentionParams,
    ) -> torch.Tensor:
        """attend() on the cache's values as stored (before its scales)."""
        decodes = metadata.decodes
        if decodes is not None and metadata.decodes_only:
            # The common step: no gather and scatter of rows.
            return self._attend_decodes(query, cache, decodes, params)

        output = torch.empty_like(query)
        if decodes is not None:
            output[decodes.token_rows] = self._attend_decodes(
                query[decodes.token_rows], cache, decodes, params
            )
        if metadata.fresh_prefills and cache.key.dtype != key.dtype:
            # Prompts attend their own K/V as the cache holds them, as later steps will read them.
            key, value = (
                _stored(rows, cache.key.dtype, scale).to(rows.dtype)
                for rows, scale in ((key, cache.key_scale), (value, cache.value_scale))
            )
        for group in metadata.fresh_prefills:
            output[group.token_rows] = self._attend_fresh(query, key, value, group, params)
        for prefill in metadata.cached_prefills:
            output[prefill.token_start : prefill.token_end] = self._attend_cached(
                query, cache, prefill, params
            )
        return output


def _stack_sequences(rows: torch.Tensor, group: FreshPrefillGroup) -> torch.Tensor:
    """[T, heads, D] flat rows -> [num_sequences, heads, length, D] for the group's chunks."""
    selected = rows[group.token_rows].view(group.num_sequences, group.length, *rows.shape[1:])
    return selected.transpose(1, 2)
