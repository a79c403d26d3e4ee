"""AWQ and GPTQ checkpoints: the packed projections read against the dequantization the formats'
libraries publish, the quantized matmul (act-order included) against the dequantized weight,
whole tiny models against transformers running the dequantized weights, tensor-parallel splits,
and the configurations Sluice refuses."""

import json
from pathlib import Path

import pytest
import torch
from packed_checkpoints import (
    act_order_groups,
    dequantized_state_dict,
    pack_awq,
    pack_gptq,
    quantize_checkpoint,
    reference_weight,
    round_to_nearest,
)
from quant_reference import INTEGER_PATH_LOGITS_TOLERANCE, integer_path_product
from safetensors.torch import load_file, save_file
from sluice_server.kernels import Kernels
from sluice_server.layers.linear import ColumnParallelLinear, Linear, RowParallelLinear
from sluice_server.layers.tensor_parallel import ShardGroup
from sluice_server.models.loader import LoadedModel, ModelLoadError, load_model
from sluice_server.quant.awq import read_awq
from sluice_server.quant.checkpoint import (
    CheckpointQuantizationError,
    checkpoint_quantization,
)
from sluice_server.quant.gptq import read_gptq
from test_models_vs_transformers import NUM_BLOCKS, all_row_logits, fresh_cache

CPU = torch.device("cpu")


def random_weight(out_features: int = 48, in_features: int = 256) -> torch.Tensor:
    generator = torch.Generator().manual_seed(out_features + in_features)
    return torch.randn(out_features, in_features, generator=generator) / 8


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_awq_projection_matches_autoawq_dequantization(group_size: int) -> None:
    packed = pack_awq(round_to_nearest(random_weight(), 4, group_size, symmetric=False))
    weight = read_awq(packed["qweight"], packed["qzeros"], packed["scales"], group_size)
    assert torch.equal(weight.dequantize(), reference_weight("awq", packed, 4))


@pytest.mark.parametrize(
    ("bits", "act_order", "zeros_minus_one"),
    [(4, False, True), (4, False, False), (4, True, True), (8, False, True), (8, True, False)],
)
def test_gptq_projection_matches_autogptq_dequantization(
    bits: int, act_order: bool, zeros_minus_one: bool
) -> None:
    original = random_weight()
    g_idx = act_order_groups(original.shape[1], 64, seed=0) if act_order else None
    packed = pack_gptq(
        round_to_nearest(original, bits, 64, symmetric=True, g_idx=g_idx), zeros_minus_one
    )
    parts = (packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"])
    weight = read_gptq(*parts, bits, zeros_minus_one)
    expected = reference_weight("gptq", packed, bits, zeros_minus_one)
    assert (weight.input_order is not None) == act_order
    assert torch.equal(weight.dequantize(), expected)
    # Rounded to the nearest step, but for the symmetric range's top, clipped by half a step.
    step = packed["scales"].float().amax()
    assert (expected - original).abs().max() <= step


@pytest.mark.parametrize("act_order", [False, True])
def test_quantized_matmul_multiplies_the_dequantized_weight(
    compiled_kernels: Kernels, act_order: bool
) -> None:
    original = random_weight(40, 256)
    g_idx = act_order_groups(256, 32, seed=1) if act_order else None
    packed = pack_gptq(round_to_nearest(original, 4, 32, True, g_idx), zeros_minus_one=True)
    weight = read_gptq(
        packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], 4, True
    ).contiguous()
    x = torch.randn(7, 256, generator=torch.Generator().manual_seed(2))
    # The compiled kernel multiplies x rounded to 16 bits; the reference ops, x itself.
    for kernels, expected in (
        (compiled_kernels, integer_path_product(x, weight)),
        (Kernels.reference(), x.double() @ weight.dequantize(torch.float64).t()),
    ):
        got = kernels.ops.quantized_linear(x, weight, None)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("method", "bits", "act_order"),
    [("awq", 4, False), ("gptq", 4, False), ("gptq", 4, True), ("gptq", 8, False)],
)
def test_quantized_model_matches_transformers_on_the_dequantized_weights(
    save_tiny_model,
    compiled_kernels: Kernels,
    tmp_path: Path,
    method: str,
    bits: int,
    act_order: bool,
) -> None:
    source, model = save_tiny_model("llama", tie_word_embeddings=False)
    quantize_checkpoint(source, tmp_path, method, bits, group_size=32, act_order=act_order)
    model.load_state_dict(dequantized_state_dict(tmp_path))
    tokens = torch.tensor([[1, 17, 42, 99, 5, 64, 23, 7]])
    with torch.no_grad():
        expected = model(tokens).logits[0]
    # The reference ops multiply the very weights; the compiled kernel rounds x to 16 bits.
    for kernels, tolerance in (
        (Kernels.reference(), 1e-4),
        (compiled_kernels, INTEGER_PATH_LOGITS_TOLERANCE),
    ):
        loaded = load_model(tmp_path, torch.float32, CPU, kernels)
        projections = [m for m in loaded.model.modules() if isinstance(m, Linear)]
        assert sum(m.quantized is not None for m in projections) == len(projections) - 1
        got = forward_logits(loaded, tokens[0])
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def forward_logits(loaded: LoadedModel, tokens: torch.Tensor) -> torch.Tensor:
    """Every position's logits of one prompt through Sluice's forward."""
    cache = fresh_cache(loaded)
    return all_row_logits(
        loaded, loaded.kernels.attention, cache, tokens.tolist(), 0, list(range(NUM_BLOCKS))
    )


def test_act_order_row_parallel_ranks_hold_their_columns_dequantized(
    save_tiny_model,
    compiled_kernels: Kernels,
    tmp_path: Path,
) -> None:
    """Act-order groups cut across a rank's slice of the input features: a row-parallel rank
    serves its columns dequantized, a column-parallel rank its rows quantized."""
    source, _ = save_tiny_model("llama", tie_word_embeddings=False)
    quantize_checkpoint(source, tmp_path, "gptq", 4, group_size=32, act_order=True)
    whole = load_model(tmp_path, torch.float32, CPU, compiled_kernels).model
    ranks = [
        load_model(tmp_path, torch.float32, CPU, compiled_kernels, ShardGroup(r, 2, None)).model
        for r in range(2)
    ]
    for (name, layer), *parts in zip(
        whole.named_modules(), *(rank.modules() for rank in ranks), strict=True
    ):
        if not isinstance(layer, Linear) or layer.quantized is None:
            continue
        dense = layer.quantized.dequantize()
        if isinstance(layer, RowParallelLinear):
            assert all(part.quantized is None for part in parts), name
            x = torch.randn(3, dense.shape[1], generator=torch.Generator().manual_seed(0))
            # Each rank's partial output (Linear.forward: before the sum across ranks).
            width = dense.shape[1] // 2
            partials = [
                Linear.forward(part, x[:, r * width : (r + 1) * width].contiguous())
                for r, part in enumerate(parts)
            ]
            torch.testing.assert_close(sum(partials), x @ dense.t(), rtol=1e-5, atol=1e-5)
        else:
            assert isinstance(layer, ColumnParallelLinear)
            assert all(part.quantized is not None for part in parts), name
            held = [part.quantized.dequantize() for part in parts]
            assert sum(h.shape[0] for h in held) == dense.shape[0]


def write_config(directory: Path, quantization: dict | None, **files: dict) -> dict:
    config = {"model_type": "llama"}
    if quantization is not None:
        config["quantization_config"] = quantization
    for name, content in files.items():
        (directory / f"{name}.json").write_text(json.dumps(content))
    return config


@pytest.mark.parametrize(
    ("quantization", "requested", "message"),
    [
        ({"quant_method": "awq"}, "gptq", "--quantize gptq conflicts with the checkpoint"),
        (None, "awq", "is not quantized"),
        ({"quant_method": "hqq"}, None, "quantized with hqq, which Sluice does not serve yet"),
        ({"quant_method": "awq", "version": "gemv"}, None, "AWQ's gemv layout"),
        ({"quant_method": "gptq", "bits": 3}, None, "3-bit GPTQ is not supported"),
        ({"quant_method": "gptq", "checkpoint_format": "marlin"}, None, "marlin format"),
        (None, "marlin", "--quantize marlin: Sluice serves awq, gptq, fp8"),
        ({"quant_method": "gptq", "bits": "four"}, None, "unreadable gptq settings"),
    ],
)
def test_quantization_the_checkpoint_cannot_serve_is_refused(
    tmp_path: Path, quantization: dict | None, requested: str | None, message: str
) -> None:
    config = write_config(tmp_path, quantization)
    with pytest.raises(CheckpointQuantizationError, match=message):
        checkpoint_quantization(tmp_path, config, requested)


def test_settings_are_read_from_transformers_and_legacy_files(tmp_path: Path) -> None:
    awq = checkpoint_quantization(
        tmp_path, write_config(tmp_path, {"quant_method": "awq", "group_size": 64}), None
    )
    assert (awq.method, awq.bits, awq.group_size) == ("awq", 4, 64)
    gptq = checkpoint_quantization(
        tmp_path, write_config(tmp_path, None, quantize_config={"bits": 8}), "gptq"
    )
    assert (gptq.method, gptq.bits, gptq.zeros_minus_one) == ("gptq", 8, True)
    assert checkpoint_quantization(tmp_path / "missing", {"model_type": "llama"}, None) is None


@pytest.fixture
def awq_checkpoint(save_tiny_model, tmp_path: Path) -> Path:
    source, _ = save_tiny_model("llama")
    quantize_checkpoint(source, tmp_path, "awq")
    return tmp_path


def test_the_loader_names_the_checkpoint_it_refuses(awq_checkpoint: Path) -> None:
    with pytest.raises(ModelLoadError, match=f"{awq_checkpoint}: --quantize gptq conflicts"):
        load_model(awq_checkpoint, torch.float32, CPU, Kernels.reference(), quantize="gptq")


def test_a_malformed_packed_projection_is_refused_by_name(awq_checkpoint: Path) -> None:
    tensors = load_file(awq_checkpoint / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.qweight"
    tensors[name] = tensors[name][:, :-1].contiguous()  # one word of 8 output features short
    save_file(tensors, awq_checkpoint / "model.safetensors")
    with pytest.raises(ModelLoadError, match="layers.0.mlp.down_proj"):
        load_model(awq_checkpoint, torch.float32, CPU, Kernels.reference())
