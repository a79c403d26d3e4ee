"""The GPU kernels for quantized weights (kernels/triton_quantized.py) against the dequantized
weight: on a GPU where there is one, else on CPU tensors under Triton's interpreter (which
conftest.py turns on before Triton is imported). The FP8 matmul (`torch._scaled_mm`) needs FP8
tensor cores, so its test runs on such a GPU only (scripts/gpu_check.sh); test_cuda.py runs
whole quantized models through these kernels there."""

from dataclasses import replace

import pytest
import torch
from quantized_weights import GROUPINGS, random_weight
from sluice_server.kernels import triton_quantized
from sluice_server.quant import CodeFormat

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

OUT_FEATURES = 37  # Not a multiple of any tile width: the last tile is partly outside.


def _expected(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    exact = x.double() @ weight.dequantize(torch.float64).T
    return exact if bias is None else exact + bias.double()


def _assert_close(y: torch.Tensor, expected: torch.Tensor) -> None:
    """float32 (IEEE products on the GPU too, not TF32) up to the order of sums, which differs
    with the threads that sum; 16-bit activations multiply the weight rounded to their dtype
    and round the output once. Either relative to the largest output."""
    tolerance = 1e-5 if y.dtype == torch.float32 else 1e-2
    atol = tolerance * expected.abs().max().item()
    torch.testing.assert_close(y.double(), expected, rtol=tolerance, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 13, 40])
@pytest.mark.parametrize(("code_format", "group_size", "offsets"), GROUPINGS)
def test_matmul_matches_the_dequantized_weight(
    rows: int, dtype: torch.dtype, code_format: CodeFormat, group_size: int, offsets: bool
) -> None:
    in_features = 224 if group_size <= 32 else 256
    weight = random_weight(OUT_FEATURES, in_features, code_format, group_size, offsets)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)).to(dtype)
    bias = torch.randn(OUT_FEATURES)
    y = triton_quantized.quantized_matmul(x.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE))
    assert y.dtype == dtype and y.shape == (rows, OUT_FEATURES)
    _assert_close(y.cpu(), _expected(x, weight, bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_gets_the_same_bits_in_any_batch(dtype: torch.dtype) -> None:
    """A row's output alone equals its output among 1, 70 and 300 rows (a decode batch, a
    prompt chunk): the tile shape does not change with the row count."""
    weight = random_weight(OUT_FEATURES, 256, CodeFormat.UINT4, 64, offsets=True).to(DEVICE)
    x = torch.randn(300, 256, generator=torch.Generator().manual_seed(5)).to(dtype).to(DEVICE)
    together = triton_quantized.quantized_matmul(x, weight)
    for row in (0, 69, 299):
        alone = triton_quantized.quantized_matmul(x[row : row + 1], weight)
        assert torch.equal(alone[0], together[row])
    assert torch.equal(triton_quantized.quantized_matmul(x[:70], weight)[69], together[69])


def test_act_order_multiplies_each_column_by_its_feature() -> None:
    """GPTQ's act-order: column j of the codes multiplies input feature input_order[j]."""
    weight = random_weight(OUT_FEATURES, 256, CodeFormat.UINT4, 32, offsets=False)
    order = torch.randperm(256, generator=torch.Generator().manual_seed(3))
    weight = replace(weight, input_order=order)
    x = torch.randn(5, 256)
    y = triton_quantized.quantized_matmul(x.to(DEVICE), weight.to(DEVICE))
    _assert_close(y.cpu(), _expected(x, weight, None))


def test_leading_dimensions_and_no_rows() -> None:
    weight = random_weight(OUT_FEATURES, 128, CodeFormat.INT8, 64, offsets=True).to(DEVICE)
    x = torch.randn(2, 3, 128, device=DEVICE)
    y = triton_quantized.quantized_matmul(x, weight)
    assert y.shape == (2, 3, OUT_FEATURES)
    flat = triton_quantized.quantized_matmul(x.reshape(6, 128), weight)
    torch.testing.assert_close(y.reshape(6, -1), flat)
    assert triton_quantized.quantized_matmul(x[:0, 0], weight).shape == (0, OUT_FEATURES)


def test_refuses_what_it_cannot_read() -> None:
    weight = random_weight(32, 128, CodeFormat.UINT4, 32, offsets=True)
    with pytest.raises(ValueError, match="features"):
        triton_quantized.quantized_matmul(torch.randn(1, 96), weight)
    with pytest.raises(ValueError, match="tile order"):
        triton_quantized.quantized_matmul(torch.randn(1, 128), replace(weight, tile_order=True))


def test_fp8_matmul_is_taken_only_where_it_applies() -> None:
    per_channel = random_weight(32, 128, CodeFormat.FLOAT8_E4M3, 128, offsets=False)
    grouped = random_weight(32, 128, CodeFormat.FLOAT8_E4M3, 64, offsets=False)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    # CPU tensors, grouped scales and float32 activations keep the Triton kernel.
    assert not triton_quantized.takes_scaled_mm(x, per_channel)
    if ON_GPU:
        per_channel, x = per_channel.to(DEVICE), x.cuda()
        assert not triton_quantized.takes_scaled_mm(x, grouped.to(DEVICE))
        assert not triton_quantized.takes_scaled_mm(x.float(), per_channel)


@pytest.mark.skipif(
    not ON_GPU or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a GPU with FP8 tensor cores (compute capability 8.9+): scripts/gpu_check.sh",
)
@pytest.mark.parametrize("rows", [1, 16, 300])
def test_fp8_matmul_matches_the_dequantized_weight(rows: int, record_property) -> None:
    """Activations rounded to e4m3 per row: 3 mantissa bits, so each product is off by up to
    1/16 of itself; over 256 random terms the output's error is a few percent of its size."""
    weight = random_weight(64, 256, CodeFormat.FLOAT8_E4M3, 256, offsets=False)
    on_gpu = weight.to(DEVICE)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)).bfloat16()
    bias = torch.randn(64)
    assert triton_quantized.takes_scaled_mm(x.cuda(), on_gpu)
    y = triton_quantized.scaled_mm_fp8(x.cuda(), on_gpu, bias.cuda())
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 64)
    # Whether a row alone gets the bits it gets among others: cuBLAS picks its FP8 algorithm by
    # shape, which the kernel's choice cannot control; recorded for the GPU check's report.
    alone = triton_quantized.scaled_mm_fp8(x[:1].cuda(), on_gpu, bias.cuda())
    record_property("first_row_equal_alone", torch.equal(alone[0], y[0]))
    expected = _expected(x, weight, bias)
    relative = ((y.cpu().double() - expected).norm() / expected.norm()).item()
    record_property("relative_error", relative)
    assert relative < 0.05
