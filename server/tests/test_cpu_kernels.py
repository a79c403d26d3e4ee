"""The compiled CPU kernels against the PyTorch reference, op by op, for each kernel build
(`--kernel-builds`, see conftest.py): the native one, and the AVX2 and portable paths whatever
the CPU has (on CPUs with AMX also the AVX-512 paths without it).

The model-level tests (test_models_vs_transformers, test_gguf) run both kernel sets in float32;
these also cover bfloat16 and the head sizes the kernels specialise (64, 128) next to a generic
one, with grouped-query attention and scattered, partly filled blocks. Attention with sliding
windows and soft-capped scores is checked against a dense reference (attention_cases.py), as
test_attention.py checks the PyTorch backend.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from attention_cases import (
    CACHE_DTYPES_8BIT,
    CHUNK_SHAPES,
    KV_SCALES,
    PARTITIONED_CHUNK_SHAPES,
    SCALED_ROWS_GAIN,
    WINDOW_AND_CAP_VARIANTS,
    WINDOW_CHUNK_SHAPES,
    AttentionStep,
    attend_8bit_cache,
    attend_scaled_8bit_cache,
    check_8bit_cache_saturates,
    check_window_and_cap,
)
from sluice_server.kernels import CpuFeatures, KernelBuild, Kernels
from sluice_server.kernels.cpu_features import lacks
from sluice_server.layers.attention import AttentionParams, LayerKVCache, SequenceChunk
from sluice_server.layers.ops import CompiledCpuOps, LinearMatmul

# Relative to the magnitude (floored at 1). bfloat16 keeps 8 significant bits, a step of 2^-7
# relative, and the reference rounds its intermediates (e.g. cos and sin) to bfloat16 too.
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def reference() -> Kernels:
    return Kernels.reference()


@pytest.fixture
def compiled_kernels(built_kernels: Kernels) -> Kernels:
    """Every test here runs against each kernel build."""
    return built_kernels


# Sluice's own matmuls, by the dtype of the weight they take.
OWN_MATMULS = {torch.bfloat16: LinearMatmul.SLUICE_BF16, torch.float32: LinearMatmul.SLUICE_F32}


def _own_matmul_ops(
    kernels: Kernels, cpu: CpuFeatures, build: KernelBuild, dtype: torch.dtype
) -> CompiledCpuOps:
    """The build's ops, choosing Sluice's own matmul for weights of `dtype`; skips where the
    build or this CPU has none."""
    module = kernels.ops.kernels
    if dtype == torch.bfloat16:
        if not cpu.sluice_bf16_matmul:
            # (AVX-512 without BF16 keeps oneDNN's bfloat16 matmul.)
            pytest.skip(lacks("AVX512-BF16, or AVX2 without AVX-512"))
        if not module.has_linear_bf16():
            pytest.skip(f"the {build.isa} kernel build is compiled without AVX512-BF16 or AVX2")
        return kernels.ops
    if not cpu.sluice_f32_matmul:
        pytest.skip(lacks("AVX2"))
    if not module.has_linear_f32():
        pytest.skip(f"the {build.isa} kernel build is compiled without AVX2 and FMA")
    return kernels.ops


def _assert_matches_float64(
    actual: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> None:
    """actual is x W^T + b to within the rounding of float32 sums of exact products (and, for
    bfloat16, of the output's rounding)."""
    expected = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    scale = expected.abs().max().item()
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert (actual.double() - expected).abs().max().item() <= tolerance * scale


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    error = (actual.float() - expected.float()).abs() / expected.float().abs().clamp(min=1)
    assert error.max().item() <= TOLERANCES[dtype], f"max relative error {error.max().item()}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("head_dim", "group", "block_size"),
    # SmolLM2's shape, a Llama-3-like one, a head size and a block size off the vector width (the
    # portable path), one query head per KV head, and a head size that AVX-512 builds add 32
    # dimensions at a time.
    [(64, 3, 16), (128, 8, 16), (48, 3, 16), (64, 3, 24), (64, 1, 32), (96, 2, 32)],
)
def test_paged_attention_matches_reference(
    compiled_kernels: Kernels,
    reference: Kernels,
    dtype: torch.dtype,
    head_dim: int,
    group: int,
    block_size: int,
) -> None:
    shapes = CHUNK_SHAPES + PARTITIONED_CHUNK_SHAPES
    step = AttentionStep.random(shapes, 3, group, head_dim, block_size, dtype, head_dim)
    params = AttentionParams(scale=head_dim**-0.5)
    _assert_close(
        step.attend(compiled_kernels.attention, params),
        step.attend(reference.attention, params),
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("head_dim", "group", "block_size"),
    # The fast paths' shape, and a generic one.
    [(64, 3, 16), (48, 2, 24)],
)
@pytest.mark.parametrize(("sliding_window", "logit_softcap", "score_gain"), WINDOW_AND_CAP_VARIANTS)
def test_paged_attention_windows_and_softcap_match_dense_reference(
    compiled_kernels: Kernels,
    dtype: torch.dtype,
    head_dim: int,
    group: int,
    block_size: int,
    sliding_window: int | None,
    logit_softcap: float | None,
    score_gain: float,
) -> None:
    check_window_and_cap(
        compiled_kernels.attention,
        dtype,
        head_dim,
        group,
        block_size,
        sliding_window,
        logit_softcap,
        score_gain,
        WINDOW_CHUNK_SHAPES + PARTITIONED_CHUNK_SHAPES,
    )


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES_8BIT)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("head_dim", "group", "block_size"),
    # The fast paths' shapes (decodes and prompt tiles), and a generic one.
    [(64, 3, 16), (128, 8, 16), (48, 3, 16)],
)
def test_paged_attention_reads_an_8bit_cache(
    compiled_kernels: Kernels,
    reference: Kernels,
    kernel_build: KernelBuild,
    cpu: CpuFeatures,
    dtype: torch.dtype,
    cache_dtype: torch.dtype,
    head_dim: int,
    group: int,
    block_size: int,
) -> None:
    """An 8-bit cache is attended as the values it holds. On the bfloat16 dot products' path the
    codes widen to bfloat16 exactly, so the output has the very bits of a bfloat16 cache holding
    the same values (where that cache takes the same path: AMX's tiles read only bfloat16); and
    it matches the PyTorch backend on an 8-bit cache, whose prompts attend their K/V rounded as
    stored too."""
    kernels = compiled_kernels.ops.kernels
    same_path = kernels.attention_has_dot_products() and not (
        cpu.amx and kernel_build.isa == "native"
    )
    step, actual = attend_8bit_cache(
        compiled_kernels.attention, dtype, cache_dtype, head_dim, group, block_size
    )
    params = AttentionParams(scale=head_dim**-0.5)
    if dtype == torch.bfloat16 and head_dim in (64, 128) and same_path:
        assert torch.equal(actual, step.attend(compiled_kernels.attention, params))
    unrounded = AttentionStep.random(
        CHUNK_SHAPES, 3, group, head_dim, block_size, dtype, seed=head_dim
    )
    _assert_close(
        unrounded.attend(compiled_kernels.attention, params, cache_dtype),
        unrounded.attend(reference.attention, params, cache_dtype),
        dtype,
    )


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES_8BIT)
@pytest.mark.parametrize("head_dim", [64, 48])
def test_paged_attention_reads_every_8bit_code_exactly(
    compiled_kernels: Kernels, cache_dtype: torch.dtype, head_dim: int
) -> None:
    """Every finite code, subnormals included, is read as its value: with float32 queries an
    8-bit cache gives the very bits of a float32 cache holding the same values, the two taking
    the same loops (the AVX2 ones widen the codes in registers; head size 48's value rows and
    the portable build widen each block through a table first)."""
    step = AttentionStep.random(
        CHUNK_SHAPES + PARTITIONED_CHUNK_SHAPES, 3, 2, head_dim, 16, torch.float32, seed=5
    )
    codes = torch.arange(256, dtype=torch.uint8).view(cache_dtype).float()
    finite = codes[codes.isfinite()]
    generator = torch.Generator().manual_seed(6)
    for rows in (step.key_rows, step.value_rows):
        rows.copy_(finite[torch.randint(len(finite), rows.shape, generator=generator)])
    # Scores of a few units, so that every key's weight counts.
    step.query.mul_(4 / torch.finfo(cache_dtype).max)
    params = AttentionParams(scale=head_dim**-0.5)
    attention = compiled_kernels.attention
    assert torch.equal(step.attend(attention, params, cache_dtype), step.attend(attention, params))


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES_8BIT)
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_attention_applies_an_8bit_caches_scales(
    compiled_kernels: Kernels, reference: Kernels, dtype: torch.dtype, cache_dtype: torch.dtype
) -> None:
    """Keys and values stored divided by the cache's scales (which bring them into e4m3's
    range), rounded as torch rounds them, and attended as the values they stand for: against
    the dense reference and the PyTorch backend."""
    step, actual = attend_scaled_8bit_cache(compiled_kernels.attention, dtype, cache_dtype)
    params = AttentionParams(scale=64**-0.5)
    torch_backend = step.attend(reference.attention, params, cache_dtype, KV_SCALES)
    # Outputs as large as the values (some cancel): errors relative to the values' size.
    error = (actual.float() - torch_backend.float()).abs().max().item() / SCALED_ROWS_GAIN
    assert error <= TOLERANCES[dtype], f"max relative error {error}"
    rows = step.value_rows[:16]
    value = torch.zeros(3, 1, 16, 64, dtype=cache_dtype)
    cache = LayerKVCache(value.transpose(2, 3).contiguous(), value, *KV_SCALES)
    compiled_kernels.attention.write(cache, rows, rows, torch.arange(16))
    largest = torch.finfo(cache_dtype).max
    expected = (rows.float() / KV_SCALES[1]).clamp(-largest, largest).to(cache_dtype)
    assert torch.equal(value[:, 0].view(torch.uint8), expected.transpose(0, 1).view(torch.uint8))


def test_kv_cache_scales_are_refused_where_they_do_not_apply(compiled_kernels: Kernels) -> None:
    kernels = compiled_kernels.ops.kernels
    rows = torch.randn(1, 1, 64)
    for cache_dtype, scale, message in (
        (torch.float32, 2.0, "8-bit float cache only"),
        (torch.float8_e4m3fn, 0.0, "must be positive"),
        (torch.float8_e4m3fn, float("nan"), "must be positive"),
    ):
        value = torch.zeros(1, 1, 16, 64, dtype=cache_dtype)
        key = value.transpose(2, 3).contiguous()
        with pytest.raises(RuntimeError, match=message):
            kernels.write_kv(key, value, rows, rows, torch.zeros(1, dtype=torch.long), scale, 1.0)
        with pytest.raises(RuntimeError, match=message):
            kernels.paged_attention(
                rows,
                key,
                value,
                torch.zeros(1, 1, dtype=torch.int32),
                torch.zeros(1, dtype=torch.int32),
                torch.tensor([0, 1], dtype=torch.int32),
                0.125,
                key_scale=1.0,
                value_scale=scale,
            )


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES_8BIT)
def test_write_kv_saturates_an_8bit_cache(
    compiled_kernels: Kernels, cache_dtype: torch.dtype
) -> None:
    check_8bit_cache_saturates(compiled_kernels.attention, cache_dtype)


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES_8BIT)
@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_rounds_to_8_bits_as_torch_does(
    compiled_kernels: Kernels, dtype: torch.dtype, cache_dtype: torch.dtype
) -> None:
    """Every code as torch rounds (to nearest, ties to even), bfloat16 rows through the kernel's
    table of all 65,536 values and float32 ones through c10's conversion; past the largest value,
    saturated. The values' bytes are checked: their layout is plain rows."""
    generator = torch.Generator().manual_seed(3)
    rows = torch.randn(256, 2, 64, generator=generator) * torch.logspace(-4, 3, 64)
    rows = rows.to(dtype)
    value = torch.zeros(2, 16, 16, 64, dtype=cache_dtype)
    cache = LayerKVCache(value.transpose(2, 3).contiguous(), value)
    compiled_kernels.attention.write(cache, rows, rows, torch.arange(256))
    largest = torch.finfo(cache_dtype).max
    expected = rows.float().clamp(-largest, largest).to(cache_dtype).transpose(0, 1)
    assert torch.equal(
        value.view(2, 256, 64).view(torch.uint8), expected.contiguous().view(torch.uint8)
    )


def test_paged_attention_rejects_a_cache_of_another_dtype(compiled_kernels: Kernels) -> None:
    kernels = compiled_kernels.ops.kernels
    query, cache = torch.zeros(2, 1, 8), torch.zeros(1, 1, 8, 8, dtype=torch.bfloat16)
    sequence = (
        torch.zeros(1, 1, dtype=torch.int32),
        torch.zeros(1, dtype=torch.int32),
        torch.tensor([0, 2], dtype=torch.int32),
    )
    with pytest.raises(RuntimeError, match="float8_e4m3fn or float8_e5m2"):
        kernels.paged_attention(query, cache, cache, *sequence, 1.0, 0, 0.0)


def test_paged_attention_takes_bfloat16_dot_products_where_the_build_has_them(
    compiled_kernels: Kernels, kernel_build: KernelBuild, cpu: CpuFeatures
) -> None:
    """The native and AVX-512 builds of a CPU with AVX512-BF16 attend with its dot products (the
    fast path compiles in); the AVX2 and portable builds never do."""
    expected = kernel_build.isa in ("native", "avx512") and cpu.avx512_bf16
    assert compiled_kernels.ops.kernels.attention_has_dot_products() is expected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("head_dim", "group", "block_size"),
    # The fast paths' shapes (whose prompt tiles and decodes take different loops), a generic one.
    [(64, 3, 16), (128, 8, 16), (64, 3, 32), (48, 2, 24)],
)
@pytest.mark.parametrize("sliding_window", [None, 20])
# A prompt, and rows after a cached prefix on both sides of the end of the kernel's first
# partition (2,048 positions).
@pytest.mark.parametrize("cached", [0, 2030])
def test_paged_attention_rows_do_not_depend_on_how_a_sequence_is_chunked(
    compiled_kernels: Kernels,
    dtype: torch.dtype,
    head_dim: int,
    group: int,
    block_size: int,
    sliding_window: int | None,
    cached: int,
) -> None:
    """Each query row gets the same bits whether its sequence's 70 rows come as one chunk, as
    chunks cut off the kernel's tiles, or one by one as decodes, and beside another sequence:
    the exact batching invariance of greedy outputs rests on it."""
    whole = AttentionStep.random([(cached, 70), (5, 9)], 2, group, head_dim, block_size, dtype, 3)
    sequence, other = whole.chunks
    params = AttentionParams(head_dim**-0.5, sliding_window)
    expected = whole.attend(compiled_kernels.attention, params)[:70]
    for cuts in ([23, 24, 54], list(range(1, 70)), [16, 17, 50]):
        bounds = [0, *cuts, 70]
        chunks = [
            SequenceChunk(cached + start, end - start, sequence.block_table)
            for start, end in itertools.pairwise(bounds)
        ]
        split = AttentionStep(
            [other, *chunks],
            block_size,
            torch.cat([whole.query[70:], whole.query[:70]]),
            whole.key_rows,
            whole.value_rows,
        )
        actual = split.attend(compiled_kernels.attention, params)[other.query_len :]
        assert torch.equal(actual, expected), f"chunks cut at {cuts}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("head_dim", "group", "block_size"), [(64, 3, 16), (48, 2, 24)])
def test_paged_attention_partitions_give_the_same_bits_on_any_thread(
    compiled_kernels: Kernels, dtype: torch.dtype, head_dim: int, group: int, block_size: int
) -> None:
    """A decode whose context the kernel splits into partitions gets the same bits alone on two
    threads (its partitions attended by different threads, merged afterwards), alone on one, and
    in a batch of many tiles (each thread merging its own tiles' partitions)."""
    batch = AttentionStep.random(
        [(4100, 1), (5, 9), (30, 20), (200, 1), (0, 37), (69, 1)],
        2,
        group,
        head_dim,
        block_size,
        dtype,
        11,
    )
    params = AttentionParams(head_dim**-0.5)
    expected = batch.attend(compiled_kernels.attention, params)[:1]
    alone = AttentionStep(
        batch.chunks[:1], block_size, batch.query[:1], batch.key_rows, batch.value_rows
    )
    threads = torch.get_num_threads()
    try:
        for count in (2, 1):
            torch.set_num_threads(count)
            actual = alone.attend(compiled_kernels.attention, params)
            assert torch.equal(actual, expected), f"{count} threads"
    finally:
        torch.set_num_threads(threads)


def test_paged_attention_rejects_a_negative_window_or_cap(compiled_kernels: Kernels) -> None:
    kernels = compiled_kernels.ops.kernels
    query, cache = torch.zeros(2, 1, 8), torch.zeros(1, 1, 8, 8)
    sequence = (
        torch.zeros(1, 1, dtype=torch.int32),
        torch.zeros(1, dtype=torch.int32),
        torch.tensor([0, 2], dtype=torch.int32),
    )
    with pytest.raises(RuntimeError, match="sliding_window must be at least 1"):
        kernels.paged_attention(query, cache, cache, *sequence, 1.0, -1, 0.0)
    with pytest.raises(RuntimeError, match="logit_softcap must be positive"):
        kernels.paged_attention(query, cache, cache, *sequence, 1.0, 0, -5.0)
    # Both 0: plain attention.
    kernels.paged_attention(query, cache, cache, *sequence, 1.0, 0, 0.0)


def test_write_kv_rejects_an_out_of_range_slot(compiled_kernels: Kernels) -> None:
    cache = LayerKVCache(torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 4, 8))
    rows = torch.zeros(1, 1, 8)
    with pytest.raises(RuntimeError, match="out of range"):
        compiled_kernels.attention.write(cache, rows, rows, torch.tensor([8]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_match_reference(
    compiled_kernels: Kernels, reference: Kernels, dtype: torch.dtype
) -> None:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 576, generator=generator).to(dtype)
    residual = torch.randn(7, 576, generator=generator).to(dtype)
    weight = torch.randn(576, generator=generator).to(dtype)
    _assert_close(
        compiled_kernels.ops.rms_norm(hidden, weight, 1e-5),
        reference.ops.rms_norm(hidden, weight, 1e-5),
        dtype,
    )
    residual_reference, residual_compiled = residual.clone(), residual.clone()
    expected = reference.ops.add_rms_norm(hidden, residual_reference, weight, 1e-5)
    actual = compiled_kernels.ops.add_rms_norm(hidden, residual_compiled, weight, 1e-5)
    _assert_close(actual, expected, dtype)
    assert torch.equal(residual_compiled, residual_reference)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_matches_reference(
    compiled_kernels: Kernels, reference: Kernels, dtype: torch.dtype
) -> None:
    generator = torch.Generator().manual_seed(1)
    # Queries and keys as a strided view of a fused qkv row, rotated in place.
    qkv = torch.randn(6, 5 * 64, generator=generator).to(dtype)
    angles = torch.rand(6, 32, generator=generator) * 100
    rotated = [qkv.clone(), qkv.clone()]
    for ops, buffer in zip((reference.ops, compiled_kernels.ops), rotated, strict=True):
        ops.rotary_(buffer[:, : 4 * 64].view(6, 4, 64), angles.cos(), angles.sin())
    _assert_close(rotated[1], rotated[0], dtype)
    assert torch.equal(rotated[1][:, 4 * 64 :], qkv[:, 4 * 64 :])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1536, 43])  # SmolLM2's, and one with a tail past 8 and 16 lanes
def test_silu_and_mul_matches_reference(
    compiled_kernels: Kernels, reference: Kernels, dtype: torch.dtype, width: int
) -> None:
    generator = torch.Generator().manual_seed(3)
    # Large magnitudes reach exp's clamped range; a column slice gives rows a longer stride.
    gate_up = (torch.randn(9, 2 * width + 8, generator=generator) * 30).to(dtype)[:, 8:]
    _assert_close(
        compiled_kernels.ops.silu_and_mul(gate_up), reference.ops.silu_and_mul(gate_up), dtype
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    ("rows", "in_features", "out_features"),
    # Decode-sized row counts around the AVX-512 8-row blocks, AVX2's direct passes (blocks of
    # up to 8 rows, 4 at a time) and 6-row widened groups and AMX's 16-row tiles, one past the
    # 256-row block, and output widths that leave part of a 32-column tile or of its 16-column
    # half. AVX2's widened passes take K 192 dimensions at a time: 576 and 1,536 in whole
    # blocks, 200 with a short last one. AMX takes input widths that are whole steps of 32; 80
    # keeps the AVX-512 loops in use on a CPU with AMX.
    [
        (1, 576, 960),
        (4, 128, 40),
        (7, 80, 40),
        (9, 576, 576),
        (13, 200, 40),
        (20, 80, 72),
        (32, 1536, 100),
        (300, 96, 72),
    ],
)
def test_own_linear_matches_torch(
    compiled_kernels: Kernels,
    cpu: CpuFeatures,
    kernel_build: KernelBuild,
    dtype: torch.dtype,
    rows: int,
    in_features: int,
    out_features: int,
    bias: bool,
) -> None:
    ops = _own_matmul_ops(compiled_kernels, cpu, kernel_build, dtype)
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
    bias_values = torch.randn(out_features, generator=generator).to(dtype) if bias else None
    packed = ops.pack_linear(weight, bias_values)
    assert packed is not None and packed.matmul is OWN_MATMULS[dtype]
    # Rows with a longer stride than their width, as a column slice of a wider tensor gives.
    wide = torch.randn(rows, in_features + 6, generator=generator).to(dtype)
    x = wide[:, 6:]
    actual = ops.packed_linear(x, packed)
    assert actual.dtype == dtype and actual.shape == (rows, out_features)
    _assert_matches_float64(actual, x, weight, bias_values, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 32])
def test_own_linear_is_the_same_at_any_thread_count(
    compiled_kernels: Kernels,
    cpu: CpuFeatures,
    kernel_build: KernelBuild,
    dtype: torch.dtype,
    rows: int,
) -> None:
    # Threads take chunks of tiles and, once done with their own, the others' last ones
    # (parallel_chunks): more threads than cores makes some slow, so that chunks change hands.
    # Every tile must be computed exactly once, the same way, whoever takes it.
    ops = _own_matmul_ops(compiled_kernels, cpu, kernel_build, dtype)
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(4112, 96, generator=generator).to(dtype)  # 129 tiles
    packed = ops.pack_linear(weight, None)
    assert packed is not None and packed.matmul is OWN_MATMULS[dtype]
    x = torch.randn(rows, 96, generator=generator).to(dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = ops.packed_linear(x, packed)
        for count in (2, 3, 5, 8):
            torch.set_num_threads(count)
            for _ in range(5):
                assert torch.equal(ops.packed_linear(x, packed), alone), f"{count} threads"
    finally:
        torch.set_num_threads(threads)
    _assert_matches_float64(alone, x, weight, None, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_features", [576, 592])
def test_own_linear_gives_a_row_the_same_output_in_any_batch(
    compiled_kernels: Kernels,
    cpu: CpuFeatures,
    kernel_build: KernelBuild,
    dtype: torch.dtype,
    in_features: int,
) -> None:
    # A request's tokens must come out the same whichever others share its step: each row's
    # sums take the same path and order whatever the row count (the AVX-512 8-row blocks, AVX2's
    # direct and widened blocks, AMX's tiles of up to 16 rows; 592 is not whole steps of 32, so
    # an AMX CPU runs it on the AVX-512 loops). A float32 sum taken in another order differs in
    # its last bits, which rounding to bfloat16 hides but for about one output in 10^4: hence
    # the many outputs. 1,800 rows are more than one pass of the threads over the tiles takes
    # (rows_per_pass: as many as fill half the L2 cache), so rows of later passes are checked too.
    # float32 outputs show any change of order in their last bits.
    ops = _own_matmul_ops(compiled_kernels, cpu, kernel_build, dtype)
    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(2048, in_features, generator=generator).to(dtype)
    packed = ops.pack_linear(weight, torch.randn(2048, generator=generator).to(dtype))
    assert packed is not None and packed.matmul is OWN_MATMULS[dtype]
    x = torch.randn(1800, in_features, generator=generator).to(dtype)
    together = ops.packed_linear(x, packed)
    slices = [(0, 1), (7, 1), (3, 5), (10, 17), (40, 33), (100, 150), (250, 50), (700, 150)]
    for first, count in slices + [(1500, 300), (1799, 1)]:
        alone = ops.packed_linear(x[first : first + count], packed)
        assert torch.equal(alone, together[first : first + count]), (first, count)


@pytest.mark.parametrize("dtype", DTYPES)
def test_own_linear_rejects_a_mismatched_input(
    compiled_kernels: Kernels, cpu: CpuFeatures, kernel_build: KernelBuild, dtype: torch.dtype
) -> None:
    ops = _own_matmul_ops(compiled_kernels, cpu, kernel_build, dtype)
    weight = torch.randn(64, 32).to(dtype)
    packed = ops.pack_linear(weight, None)
    assert packed is not None and packed.matmul is OWN_MATMULS[dtype]
    with pytest.raises(RuntimeError, match="columns"):
        ops.packed_linear(torch.randn(4, 30).to(dtype), packed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [49152, 49157])  # whole vectors, and a ragged end
def test_argmax_logprob_matches_reference(
    compiled_kernels: Kernels, reference: Kernels, dtype: torch.dtype, vocab: int
) -> None:
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(5, vocab, generator=generator) * 8
    logits[3, 17] = logits[3, 4000] = logits[3].max() + 1  # A tie: the first index wins.
    logits[4, -1] = logits[4].max() + 1  # The last token, past the last whole vector.
    logits = logits.to(dtype)  # The model's logits come in its own dtype.
    expected_ids, expected_logprobs = reference.ops.argmax_logprob(logits)
    ids, logprobs = compiled_kernels.ops.argmax_logprob(logits)
    assert torch.equal(ids, expected_ids) and ids[3].item() == 17 and ids[4].item() == vocab - 1
    assert torch.allclose(logprobs, expected_logprobs, atol=1e-5)


def _sampling_logits() -> torch.Tensor:
    """Processed logits over SmolLM2's vocabulary: peaked rows (a language model's shape) and a
    flat one, whose top-p cut lies thousands of tokens down."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 49152, generator=generator)
    logits[:5] *= 4
    logits[2, 100:140] += 12  # A few very likely tokens.
    logits[5] *= 0.3
    return logits


@pytest.mark.parametrize(
    ("top_k", "top_p"),
    [(0, 0.9), (50, 1.0), (50, 0.8), (3000, 0.95), (0, 0.95), (1, 0.5)],
)
def test_top_k_top_p_matches_reference(
    compiled_kernels: Kernels, reference: Kernels, top_k: int, top_p: float
) -> None:
    # A last row with neither filter must come back untouched.
    logits = torch.cat([_sampling_logits(), _sampling_logits()[:1]])
    ks = torch.tensor([top_k] * 6 + [0])
    ps = torch.tensor([top_p] * 6 + [1.0])
    expected, actual = logits.clone(), logits.clone()
    reference.ops.top_k_top_p_(expected, ks, ps)
    compiled_kernels.ops.top_k_top_p_(actual, ks, ps)
    assert torch.equal(torch.isfinite(actual), torch.isfinite(expected))
    kept = torch.isfinite(expected)
    assert torch.equal(actual[kept], logits[kept])
    assert torch.equal(actual[6], logits[6])
    # Each filter cut something from every filtered row: the comparison is not vacuous.
    assert bool((kept[:6].sum(dim=-1) < 49152).all())


@pytest.mark.parametrize(
    ("cut", "value", "off"),
    [
        ("min_p_", 0.05, 0.0),
        ("min_p_", 0.5, 0.0),
        ("typical_p_", 0.9, 1.0),
        ("typical_p_", 0.5, 1.0),
    ],
)
def test_one_parameter_cut_matches_reference(
    compiled_kernels: Kernels, reference: Kernels, cut: str, value: float, off: float
) -> None:
    # A last row with the cut off must come back untouched.
    logits = torch.cat([_sampling_logits(), _sampling_logits()[:1]])
    values = torch.tensor([value] * 6 + [off])
    expected, actual = logits.clone(), logits.clone()
    getattr(reference.ops, cut)(expected, values)
    getattr(compiled_kernels.ops, cut)(actual, values)
    assert torch.equal(torch.isfinite(actual), torch.isfinite(expected))
    kept = torch.isfinite(expected)
    assert torch.equal(actual[kept], logits[kept])
    assert torch.equal(actual[6], logits[6])
    # The cut removed something from every row it was on, so the comparison is not vacuous;
    # except min-p from the flat sixth row, whose logits all lie within log(1 / 0.05) of the
    # largest.
    cut_rows = 5 if cut == "min_p_" else 6
    assert bool((kept[:cut_rows].sum(dim=-1) < 49152).all())


def test_draw_matches_reference(compiled_kernels: Kernels, reference: Kernels) -> None:
    """The same uniform numbers pick the same tokens; filtered tokens (-inf) are never picked."""
    logits = _sampling_logits().repeat(8, 1)  # 48 rows
    reference.ops.top_k_top_p_(logits, torch.zeros(48, dtype=torch.long), torch.full((48,), 0.95))
    uniforms = torch.rand(48, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    uniforms[0], uniforms[1] = 0.0, 1.0 - 2**-53  # Both ends of the range.
    expected_ids, expected_totals = reference.ops.draw(logits, uniforms)
    ids, totals = compiled_kernels.ops.draw(logits, uniforms)
    assert torch.equal(ids, expected_ids)
    assert bool(torch.isfinite(logits.gather(1, ids[:, None])).all())
    assert torch.allclose(totals, expected_totals, atol=1e-5)


def test_draw_without_weight_matches_reference(
    compiled_kernels: Kernels, reference: Kernels
) -> None:
    """Rows of bad logits (NaN, -inf, +inf) draw the same in-vocabulary token on both sides:
    a NaN weighs nothing, a row without weight gets token 0."""
    vocab = 1000  # not whole chunks of the PyTorch draw's search
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(5))
    logits[0, ::7] = float("nan")
    logits[1] = float("nan")
    logits[2] = float("-inf")
    logits[3, 17] = float("inf")
    logits[4, :] = float("-inf")
    logits[4, 999] = float("nan")
    uniforms = torch.full((5,), 0.999, dtype=torch.float64)
    expected_ids, expected_totals = reference.ops.draw(logits, uniforms)
    ids, totals = compiled_kernels.ops.draw(logits, uniforms)
    assert torch.equal(ids, expected_ids)
    assert ids[1:].tolist() == [0, 0, 0, 0]
    assert not bool(logits[0, ids[0]].isnan())
    assert torch.allclose(totals, expected_totals, atol=1e-5, equal_nan=True)
