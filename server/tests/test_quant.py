"""Quantized weights: the block formats read against the reference library's own dequantization
(`gguf`, llama.cpp's Python package), the quantized matmul of every kernel build against the
dequantized weight, and the default model's GGUF served quantized."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from quant_reference import integer_path_product, rounded_activations, takes_integer_path
from quantized_weights import GROUPINGS, random_weight
from sluice_server.kernels import Kernels
from sluice_server.quant import CodeFormat, QuantizedWeight, pack_4bit
from sluice_server.quant.gguf import _read_blocks

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def test_4bit_packing_round_trips() -> None:
    codes = torch.randint(0, 16, (5, 96))
    weight = QuantizedWeight(pack_4bit(codes), torch.ones(5, 3), None, CodeFormat.UINT4, 32)
    assert torch.equal(weight.unpacked_codes(), codes)
    assert weight.codes.shape == (5, 48)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_gguf_blocks_match_gguf_dequantization(qtype: "gguf.GGMLQuantizationType") -> None:
    values = np.random.default_rng(0).standard_normal((6, 256)).astype(np.float32)
    blocks = gguf.quants.quantize(values, qtype)
    weight = _read_blocks(qtype.name, blocks)
    assert weight is not None
    expected = gguf.quants.dequantize(blocks, qtype)
    np.testing.assert_array_equal(weight.dequantize().numpy(), expected)


def test_q4_k_blocks_match_gguf_dequantization() -> None:
    # gguf has no Q4_K quantizer in Python: random blocks with finite float16 scales instead.
    rng = np.random.default_rng(1)
    rows, superblocks = 4, 3
    blocks = rng.integers(0, 256, (rows, superblocks, 144), dtype=np.uint8)
    halves = rng.uniform(0.001, 0.1, (rows, superblocks, 2)).astype(np.float16)
    blocks[..., :4] = halves.view(np.uint8)
    data = blocks.reshape(rows, -1)
    weight = _read_blocks("Q4_K", data)
    assert weight is not None
    expected = gguf.quants.dequantize(data, Q.Q4_K)
    np.testing.assert_allclose(weight.dequantize().numpy(), expected, rtol=1e-6, atol=1e-6)


def test_q6_k_blocks_match_gguf_dequantization() -> None:
    # gguf has no Q6_K quantizer in Python: random blocks with a finite float16 d instead.
    rng = np.random.default_rng(2)
    rows, superblocks = 3, 2
    blocks = rng.integers(0, 256, (rows, superblocks, 210), dtype=np.uint8)
    d = rng.uniform(0.001, 0.1, (rows, superblocks, 1)).astype(np.float16)
    blocks[..., 208:] = d.view(np.uint8)
    data = blocks.reshape(rows, -1)
    weight = _read_blocks("Q6_K", data)
    assert weight is not None and weight.group_size == 16
    expected = gguf.quants.dequantize(data, Q.Q6_K)
    np.testing.assert_allclose(weight.dequantize().numpy(), expected, rtol=1e-6, atol=1e-6)


def test_unread_formats_are_left_unquantized() -> None:
    assert _read_blocks("Q5_K", np.zeros((2, 176), dtype=np.uint8)) is None


def test_slices_hold_whole_groups() -> None:
    weight = random_weight(8, 128, CodeFormat.UINT4, group_size=32, offsets=True)
    dense = weight.dequantize()
    assert torch.equal(weight.rows(2, 5).dequantize(), dense[2:5])
    assert torch.equal(weight.columns(32, 96).dequantize(), dense[:, 32:96])
    padded = weight.padded_rows(3).dequantize()
    assert torch.equal(padded[:8], dense) and not padded[8:].any()
    with pytest.raises(ValueError, match="split a quantization group"):
        weight.columns(16, 64)


def test_per_channel_scales_slice_at_any_block() -> None:
    weight = random_weight(8, 128, CodeFormat.FLOAT8_E4M3, group_size=128, offsets=False)
    part = weight.columns(32, 96)
    assert part.group_size == 64
    assert torch.equal(part.dequantize(), weight.dequantize()[:, 32:96])




@pytest.mark.parametrize("rows", [1, 3, 8, 13])
@pytest.mark.parametrize(("code_format", "group_size", "offsets"), GROUPINGS)
def test_quantized_matmul_matches_the_dequantized_weight(
    built_kernels: Kernels, rows: int, code_format: CodeFormat, group_size: int, offsets: bool
) -> None:
    # Small groups allow a width that ends in a part of a chunk of codes.
    in_features = 224 if group_size <= 32 else 256
    weight = random_weight(37, in_features, code_format, group_size, offsets)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    bias = torch.randn(37)
    exact = x.double() @ weight.dequantize(torch.float64).T + bias.double()
    y = built_kernels.ops.quantized_linear(x, weight, bias)
    if not takes_integer_path(weight):
        torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-4)
    else:
        # The codes multiply x rounded to integers: exactly that, up to float32 sums...
        expected = integer_path_product(x, weight) + bias.double()
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-4)
        # ... which is within half a rounding step per feature of the exact product.
        step = rounded_activations(x, weight, step=True)
        scaled = replace(weight, offsets=None).dequantize(torch.float64)
        assert ((y.double() - exact).abs() <= step @ scaled.abs().T / 2 + 1e-4).all()
    # bfloat16 activations: computed in float32, rounded once at the end.
    y_bf16 = built_kernels.ops.quantized_linear(x.bfloat16(), weight, None)
    assert y_bf16.dtype == torch.bfloat16
    if takes_integer_path(weight):
        expected_bf16 = integer_path_product(x.bfloat16(), weight)
    else:
        expected_bf16 = x.bfloat16().double() @ weight.dequantize(torch.float64).T
    torch.testing.assert_close(y_bf16.double(), expected_bf16, rtol=0.01, atol=1e-3)


def test_reference_ops_multiply_by_the_dequantized_weight() -> None:
    weight = random_weight(9, 64, CodeFormat.UINT4, group_size=32, offsets=True)
    x = torch.randn(3, 64)
    y = Kernels.reference().ops.quantized_linear(x, weight, None)
    torch.testing.assert_close(y, x @ weight.dequantize().T)


# Widths that end in a part of a chunk of codes, for every chunk width the builds use.
@pytest.mark.parametrize("in_features", [192, 224])
@pytest.mark.parametrize("code_format", list(CodeFormat))
def test_quantized_matmul_rows_do_not_depend_on_the_batch(
    built_kernels: Kernels, code_format: CodeFormat, in_features: int
) -> None:
    # A request's output must not change with what it is batched with.
    weight = random_weight(50, in_features, code_format, group_size=32, offsets=True)
    x = torch.randn(19, in_features)
    batched = built_kernels.ops.quantized_linear(x, weight, None)
    for row in range(x.shape[0]):
        alone = built_kernels.ops.quantized_linear(x[row : row + 1], weight, None)
        assert torch.equal(alone[0], batched[row]), row


@pytest.mark.parametrize(("code_format", "group_size", "offsets"), GROUPINGS)
def test_quantized_matmul_takes_prompt_rows_through_bfloat16_tiles(
    built_kernels: Kernels, code_format: CodeFormat, group_size: int, offsets: bool
) -> None:
    # 50 columns: a last tile of 18. Small groups allow a width that ends in a part of a chunk.
    in_features = 224 if group_size <= 32 else 256
    weight = random_weight(50, in_features, code_format, group_size, offsets)
    x = torch.randn(11, in_features, generator=torch.Generator().manual_seed(7)).bfloat16()
    bias = torch.randn(50)
    prompt = torch.tensor([9, 0, 1, 2, 5, 6, 7, 8])
    others = torch.tensor([3, 4, 10])
    y = built_kernels.ops.quantized_linear(x, weight, bias, prompt)
    decoded = built_kernels.ops.quantized_linear(x, weight, bias)
    # The other rows are computed as without prompt rows, to the bit.
    assert torch.equal(y[others], decoded[others])
    kernels = built_kernels.ops.kernels
    if "avx2" not in kernels.compiled_isa():
        # No bfloat16 matmul in this build: every row takes the paths for decoding.
        assert torch.equal(y, decoded)
        return
    # Prompt rows: linear_bf16's product with the weight rounded to bfloat16, to the bit.
    packed = kernels.pack_linear_bf16(weight.dequantize(torch.bfloat16))
    padded_bias = torch.cat([bias, torch.zeros(packed.shape[0] * 32 - 50)])
    assert torch.equal(y[prompt], kernels.linear_bf16(x[prompt], packed, padded_bias, 50))
    # A prompt row alone, or with other rows, prompt or not, has the same bits.
    for row in prompt.tolist():
        alone = built_kernels.ops.quantized_linear(
            x[row : row + 1], weight, bias, torch.tensor([0])
        )
        assert torch.equal(alone[0], y[row]), row
    # float32 activations keep the paths for decoding on every row.
    x32 = x.float()
    assert torch.equal(
        built_kernels.ops.quantized_linear(x32, weight, bias, prompt),
        built_kernels.ops.quantized_linear(x32, weight, bias),
    )


@pytest.mark.parametrize(
    ("code_format", "group_size", "offsets"),
    [
        (CodeFormat.UINT4, 32, True),
        (CodeFormat.UINT4, 128, False),
        (CodeFormat.INT8, 16, False),
        (CodeFormat.INT8, 128, True),
    ],
)
def test_codes_in_tile_order_give_the_same_bits(
    built_kernels: Kernels, code_format: CodeFormat, group_size: int, offsets: bool
) -> None:
    # Where the CPU has AMX, a layer's integer codes are regrouped for its tiles when the model
    # is prepared: the kernel then reads them as they lie instead of transposing them on every
    # call, and must compute the very same outputs.
    ops = built_kernels.ops
    if "amx_int8" not in ops.kernels.compiled_isa():
        pytest.skip("this kernel build has no AMX integer tiles")
    weight = random_weight(48, 256, code_format, group_size, offsets)
    prepared = ops.prepare_quantized(weight, torch.bfloat16)
    if not prepared.tile_order:
        pytest.skip("Linux does not grant this process AMX's tiles")
    assert prepared.codes.shape == weight.codes.shape
    assert torch.equal(prepared.dequantize(), weight.dequantize())
    with pytest.raises(ValueError, match="tile order"):
        prepared.rows(0, 16)
    bias = torch.randn(48)
    # Up to 11 rows take AVX512-VNNI, more AMX (19: a tile of 16 rows and part of another).
    for rows in (1, 3, 5, 19, 40):
        x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)).bfloat16()
        assert torch.equal(
            ops.quantized_linear(x, prepared, bias), ops.quantized_linear(x, weight, bias)
        ), rows
        # Prompt rows read the regrouped codes to dequantize them.
        prompt = torch.arange(0, rows, 2)
        assert torch.equal(
            ops.quantized_linear(x, prepared, bias, prompt),
            ops.quantized_linear(x, weight, bias, prompt),
        ), rows


@pytest.mark.parametrize(
    ("code_format", "group_size", "offsets", "out_features"),
    [
        (CodeFormat.UINT4, 32, True, 48),
        (CodeFormat.UINT4, 128, False, 64),
        (CodeFormat.UINT4, 64, True, 80),
        (CodeFormat.FLOAT8_E4M3, 256, False, 48),
        (CodeFormat.FLOAT8_E4M3, 128, False, 64),
        (CodeFormat.FLOAT8_E4M3, 32, False, 80),
        (CodeFormat.LEVELS4, 64, False, 48),
        (CodeFormat.LEVELS4, 32, True, 80),
    ],
)
def test_codes_in_tile_order_take_bfloat16_dot_products(
    built_kernels: Kernels,
    code_format: CodeFormat,
    group_size: int,
    offsets: bool,
    out_features: int,
) -> None:
    # With AVX512-BF16, a bfloat16 model's FP8 codes and indexes into levels, and without AMX its
    # 4-bit integer codes, are regrouped at load so that dot products (or for FP8 codes and
    # levels without offsets, AMX's bfloat16 tiles) multiply them by the rows as they are (80
    # columns: a tile of 32 columns and half of one more; FP8 codes include every value but NaN,
    # subnormals too).
    ops = built_kernels.ops
    isa = ops.kernels.compiled_isa()
    if "avx512_bf16" not in isa:
        pytest.skip("bfloat16 dot products need AVX512-BF16")
    if code_format is CodeFormat.UINT4 and "amx_int8" in isa:
        pytest.skip("with AMX, 4-bit codes take AMX's integer tiles")
    weight = random_weight(out_features, 256, code_format, group_size, offsets)
    prepared = ops.prepare_quantized(weight, torch.bfloat16)
    assert prepared.tile_order
    assert torch.equal(prepared.dequantize(), weight.dequantize())
    # float32 activations keep their path, in column order.
    assert not ops.prepare_quantized(weight, torch.float32).tile_order
    with pytest.raises(RuntimeError, match="bfloat16 rows only"):
        ops.quantized_linear(torch.randn(2, 256), prepared, None)
    x = torch.randn(40, 256, generator=torch.Generator().manual_seed(40)).bfloat16()
    bias = torch.randn(out_features)
    y = ops.quantized_linear(x, prepared, bias)

    def within(weight: QuantizedWeight, relative: float) -> bool:
        """Whether y is the product with the dequantized `weight`, up to the bfloat16 output
        and `relative` times the products' magnitudes."""
        dequantized = weight.dequantize(torch.float64)
        exact = x.double() @ dequantized.T + bias.double()
        magnitude = x.double().abs() @ dequantized.abs().T
        return bool(((y.double() - exact).abs() <= exact.abs() / 256 + magnitude * relative).all())

    if code_format is CodeFormat.LEVELS4:
        # The levels are rounded to bfloat16 (as bitsandbytes rounds a bfloat16 model's weights),
        # then the sums run in float32.
        assert within(replace(weight, levels=weight.levels.bfloat16().float()), 1e-5)
        assert within(weight, 1 / 256)
    else:
        # Up to float32 sums.
        assert within(weight, 1e-5)
    # Every row alone gives the bits it gives in the batch (passes of a few rows; with AMX, FP8
    # codes take a block of 32 rows and one of 8).
    for row in range(x.shape[0]):
        alone = ops.quantized_linear(x[row : row + 1], prepared, bias)
        assert torch.equal(alone[0], y[row]), row
    # Prompt rows still take the bfloat16 tiles, dequantized from the regrouped codes.
    prompt = torch.arange(0, x.shape[0], 2)
    assert torch.equal(
        ops.quantized_linear(x, prepared, bias, prompt)[prompt],
        ops.quantized_linear(x, weight, bias, prompt)[prompt],
    )


def test_quantized_matmul_refuses_mismatched_inputs(built_kernels: Kernels) -> None:
    weight = random_weight(8, 64, CodeFormat.UINT4, group_size=32, offsets=True)
    kernels = built_kernels.ops.kernels
    with pytest.raises(RuntimeError, match="x must be"):
        kernels.linear_quantized(torch.randn(2, 96), weight.codes, weight.scales, None, None, 0, 32)
    with pytest.raises(RuntimeError, match="scales must be"):
        kernels.linear_quantized(
            torch.randn(2, 64), weight.codes, weight.scales[:, :1], None, None, 0, 32
        )
    with pytest.raises(RuntimeError, match="unknown code format"):
        kernels.linear_quantized(torch.randn(2, 64), weight.codes, weight.scales, None, None, 7, 32)
    with pytest.raises(RuntimeError, match="levels are given with"):
        kernels.linear_quantized(torch.randn(2, 64), weight.codes, weight.scales, None, None, 3, 32)
    x = torch.randn(3, 64).bfloat16()
    for rows in ([0, 3], [1, 1], [-1]):
        with pytest.raises(RuntimeError, match="prompt_rows lists row"):
            built_kernels.ops.quantized_linear(x, weight, None, torch.tensor(rows))
    with pytest.raises(RuntimeError, match="prompt_rows must be int64"):
        built_kernels.ops.quantized_linear(x, weight, None, torch.tensor([0.0]))
    with pytest.raises(RuntimeError, match="levels must be"):
        kernels.linear_quantized(
            torch.randn(2, 64), weight.codes, weight.scales, None, None, 3, 32, torch.ones(8)
        )
