"""Steps for the attention backends' tests: chunks of several sequences on scattered cache blocks,
attended by a backend through its own cache layout, and a dense reference that attends each
query on its own from explicit positions."""

from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch
from sluice_server.layers.attention import (
    AttentionBackend,
    AttentionParams,
    LayerKVCache,
    SequenceChunk,
)

# (cache_len, query_len) of a step's chunks: decodes with contexts inside a block, at a block
# boundary and across many blocks; prompts that start their sequence (two of one length, which
# the reference backend attends together, and one longer than the compiled kernel's 16-row tile);
# and chunks after a cached prefix (the later chunks of a chunked prefill), one of them tiles
# long.
CHUNK_SHAPES = [(0, 1), (15, 1), (16, 1), (69, 1), (199, 1), (0, 7), (0, 7), (0, 37), (21, 12)]
# For the compiled kernel, which splits contexts into partitions of 2,048 positions: decodes
# across two and three partitions, and a chunk whose rows lie on both sides of a partition's end.
PARTITIONED_CHUNK_SHAPES = [(2100, 1), (4200, 1), (2030, 40)]
# For windows, also decodes and a prefill chunk whose contexts reach many blocks past it.
WINDOW_CHUNK_SHAPES = [*CHUNK_SHAPES, (250, 1), (100, 40)]

# (sliding_window, logit_softcap, score_gain): windows of a block (16), of more than a block but
# not a multiple of one, of the query alone, of more than a partition of the compiled kernel, and
# past every context (the same as none); the cap alone, and with a window, the scores (scaled up
# by score_gain) reaching well past it.
WINDOW_AND_CAP_VARIANTS = [
    pytest.param(16, None, 1.0, id="window-16"),
    pytest.param(20, None, 1.0, id="window-20"),
    pytest.param(1, None, 1.0, id="window-1"),
    pytest.param(2100, None, 1.0, id="window-2100"),
    pytest.param(5000, None, 1.0, id="window-past-context"),
    pytest.param(None, 2.0, 1.0, id="softcap"),
    pytest.param(20, 30.0, 10.0, id="window-20-softcap"),
]

# Of the largest magnitude (floored at 1), against the float64 reference computed from the same
# stored inputs. bfloat16 rounds the output, and the reference backend's uncapped paths round
# their scores and weights too.
TOLERANCES = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


@dataclass
class AttentionStep:
    chunks: list[SequenceChunk]
    block_size: int
    # The flat batch's queries, [T, num_heads, head_dim].
    query: torch.Tensor
    # Every cache slot's key and value, [num_blocks * block_size, num_kv_heads, head_dim].
    key_rows: torch.Tensor
    value_rows: torch.Tensor

    @classmethod
    def random(
        cls,
        shapes: Sequence[tuple[int, int]],
        num_kv_heads: int,
        group: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype,
        seed: int,
    ) -> "AttentionStep":
        generator = torch.Generator().manual_seed(seed)
        blocks_each = [-(-(cache_len + query_len) // block_size) for cache_len, query_len in shapes]
        # Spare blocks too, so that the sequences' blocks are scattered among unused ones.
        num_blocks = sum(blocks_each) + 8
        free_blocks = torch.randperm(num_blocks, generator=generator).tolist()
        chunks = []
        for (cache_len, query_len), blocks in zip(shapes, blocks_each, strict=True):
            table, free_blocks = free_blocks[:blocks], free_blocks[blocks:]
            chunks.append(SequenceChunk(cache_len, query_len, table))
        key_rows, value_rows = (
            torch.randn(num_blocks * block_size, num_kv_heads, head_dim, generator=generator)
            for _ in range(2)
        )
        num_tokens = sum(query_len for _cache_len, query_len in shapes)
        query = torch.randn(num_tokens, num_kv_heads * group, head_dim, generator=generator)
        return cls(chunks, block_size, query.to(dtype), key_rows.to(dtype), value_rows.to(dtype))

    def slot(self, chunk: SequenceChunk, position: int) -> int:
        return chunk.block_table[position // self.block_size] * self.block_size + (
            position % self.block_size
        )

    def round_rows_to(
        self, cache_dtype: torch.dtype, scales: tuple[float, float] = (1.0, 1.0)
    ) -> None:
        """Rounds every slot's K/V to what an 8-bit cache of `cache_dtype` stores divided by
        `scales` (key, value) holds, so that the dense reference attends those values."""
        for rows, scale in zip((self.key_rows, self.value_rows), scales):
            rows.copy_(((rows.float() / scale).to(cache_dtype).float() * scale).to(rows.dtype))

    def poison_blocks_before(self, window: int) -> None:
        """Sets to NaN the K/V of every block that lies wholly before the window of its chunk's
        first query (and so of all its queries): a backend that reads any of them, rather than
        skipping them, returns NaN."""
        for chunk in self.chunks:
            first_seen = max(0, chunk.cache_len - window + 1)
            for position in range(first_seen // self.block_size * self.block_size):
                self.key_rows[self.slot(chunk, position)] = float("nan")
                self.value_rows[self.slot(chunk, position)] = float("nan")

    def attend(
        self,
        backend: AttentionBackend,
        params: AttentionParams,
        cache_dtype: torch.dtype | None = None,
        scales: tuple[float, float] = (1.0, 1.0),
    ) -> torch.Tensor:
        """The step attended by `backend`, every slot's K/V written through its own write (and
        layout) first, into a cache of `cache_dtype` (default: the rows') with `scales` (key,
        value), the new tokens' also passed as the model passes them."""
        num_kv_heads, head_dim = self.key_rows.shape[1:]
        num_blocks = self.key_rows.shape[0] // self.block_size
        value = torch.zeros(
            num_kv_heads,
            num_blocks,
            self.block_size,
            head_dim,
            dtype=cache_dtype or self.value_rows.dtype,
        )
        key = value.transpose(2, 3).contiguous() if backend.transposed_keys else value.clone()
        cache = LayerKVCache(key, value, *scales)
        all_slots = torch.arange(num_blocks * self.block_size)
        backend.write(cache, self.key_rows, self.value_rows, all_slots)
        metadata = backend.build_metadata(self.chunks, self.block_size, torch.device("cpu"))
        new_key = self.key_rows[metadata.slot_mapping]
        new_value = self.value_rows[metadata.slot_mapping]
        return backend.attend(self.query, new_key, new_value, cache, metadata, params)

    def dense_reference(self, params: AttentionParams) -> torch.Tensor:
        """[T, num_heads, head_dim] in float64: each query row attends the keys at the positions
        its window holds, read from their slots, with the scores soft-capped where asked."""
        num_heads = self.query.shape[1]
        group = num_heads // self.key_rows.shape[1]
        window = params.sliding_window
        outputs = []
        row = 0
        for chunk in self.chunks:
            for position in range(chunk.cache_len, chunk.context_len):
                first_seen = 0 if window is None else max(0, position - window + 1)
                slots = [self.slot(chunk, p) for p in range(first_seen, position + 1)]
                # [seen, num_heads, head_dim]: query head h reads KV head h // group.
                keys = self.key_rows[slots].double().repeat_interleave(group, dim=1)
                values = self.value_rows[slots].double().repeat_interleave(group, dim=1)
                scores = torch.einsum("hd,khd->hk", self.query[row].double(), keys) * params.scale
                if params.logit_softcap is not None:
                    scores = params.logit_softcap * torch.tanh(scores / params.logit_softcap)
                outputs.append(torch.einsum("hk,khd->hd", torch.softmax(scores, dim=-1), values))
                row += 1
        return torch.stack(outputs)


def check_window_and_cap(
    backend: AttentionBackend,
    dtype: torch.dtype,
    head_dim: int,
    group: int,
    block_size: int,
    sliding_window: int | None,
    logit_softcap: float | None,
    score_gain: float,
    shapes: Sequence[tuple[int, int]] = WINDOW_CHUNK_SHAPES,
) -> None:
    """`backend` attends `shapes` as the dense reference does, never reading a block before a
    window; a window past every context changes nothing, and every other variant changes the
    answer (so the check would see it ignored)."""
    step = AttentionStep.random(shapes, 2, group, head_dim, block_size, dtype, seed=7)
    scale = score_gain * head_dim**-0.5
    params = AttentionParams(scale, sliding_window, logit_softcap)
    plain = AttentionParams(scale)
    longest = max(chunk.context_len for chunk in step.chunks)
    if sliding_window is not None and sliding_window >= longest:
        assert torch.equal(step.attend(backend, params), step.attend(backend, plain))
    else:
        # Row by row, relative to the row: a row's output averages more values, and so is
        # smaller, the longer its context.
        unchanged = step.dense_reference(plain)
        difference = step.dense_reference(params) - unchanged
        relative = difference.abs().amax(dim=(1, 2)) / unchanged.abs().amax(dim=(1, 2))
        assert relative.max().item() > 0.1
    if sliding_window is not None:
        step.poison_blocks_before(sliding_window)
    actual = step.attend(backend, params)
    expected = step.dense_reference(params)
    error = (actual.double() - expected).abs() / expected.abs().clamp(min=1)
    assert error.max().item() <= TOLERANCES[dtype], f"max relative error {error.max().item()}"


# --kv-cache-dtype's 8-bit floats.
CACHE_DTYPES_8BIT = [torch.float8_e4m3fn, torch.float8_e5m2]


def attend_8bit_cache(
    backend: AttentionBackend,
    dtype: torch.dtype,
    cache_dtype: torch.dtype,
    head_dim: int,
    group: int,
    block_size: int,
) -> tuple[AttentionStep, torch.Tensor]:
    """A step whose K/V are values `cache_dtype` holds, attended by `backend` from a cache of
    that dtype: as the dense reference attends those values. Returns the step and the output."""
    shapes = CHUNK_SHAPES + PARTITIONED_CHUNK_SHAPES
    step = AttentionStep.random(shapes, 3, group, head_dim, block_size, dtype, seed=head_dim)
    step.round_rows_to(cache_dtype)
    params = AttentionParams(scale=head_dim**-0.5)
    actual = step.attend(backend, params, cache_dtype)
    expected = step.dense_reference(params)
    error = (actual.double() - expected).abs() / expected.abs().clamp(min=1)
    assert error.max().item() <= TOLERANCES[dtype], f"max relative error {error.max().item()}"
    return step, actual


# Keys and values an e4m3 cache saturates on unscaled (|x| past 448), and the scales that bring
# them in range.
SCALED_ROWS_GAIN = 300.0
KV_SCALES = (3.0, 2.5)


def attend_scaled_8bit_cache(
    backend: AttentionBackend, dtype: torch.dtype, cache_dtype: torch.dtype
) -> tuple[AttentionStep, torch.Tensor]:
    """A step whose K/V reach past e4m3's range, attended by `backend` from an 8-bit cache
    holding them divided by KV_SCALES: as the dense reference attends the values it holds (a
    backend that left out a scale, writing or reading, is far off). Returns the step and the
    output."""
    shapes = CHUNK_SHAPES + PARTITIONED_CHUNK_SHAPES
    step = AttentionStep.random(shapes, 3, 3, 64, 16, dtype, seed=7)
    for rows in (step.key_rows, step.value_rows):
        rows.mul_(SCALED_ROWS_GAIN)
    step.query.div_(SCALED_ROWS_GAIN)  # Scores of a few units.
    step.round_rows_to(cache_dtype, KV_SCALES)
    params = AttentionParams(scale=64**-0.5)
    actual = step.attend(backend, params, cache_dtype, KV_SCALES)
    expected = step.dense_reference(params)
    error = (actual.double() - expected).abs() / expected.abs().clamp(min=SCALED_ROWS_GAIN)
    assert error.max().item() <= TOLERANCES[dtype], f"max relative error {error.max().item()}"
    return step, actual


def check_8bit_cache_saturates(backend: AttentionBackend, cache_dtype: torch.dtype) -> None:
    """Keys and values past the 8-bit format's range are stored as its largest value, with their
    sign, not as NaN or infinity; NaN stays NaN."""
    largest = torch.finfo(cache_dtype).max
    rows = torch.tensor([[[1e9, -1e9, 1.5, float("nan")]]])
    value = torch.zeros(1, 1, 4, 4, dtype=cache_dtype)
    key = value.transpose(2, 3).contiguous() if backend.transposed_keys else value.clone()
    cache = LayerKVCache(key, value)
    backend.write(cache, rows, rows, torch.tensor([2]))
    stored = cache.value[0, 0, 2].float()
    assert stored[:3].tolist() == [largest, -largest, 1.5]
    assert stored[3].isnan()
    key_row = cache.key.float().flatten()
    assert sorted(key_row[~key_row.isnan() & (key_row != 0)].tolist()) == [-largest, 1.5, largest]
