"""FP8 checkpoints and quantizing at load (`--quantize fp8`, bitsandbytes'): compressed-tensors
checkpoints written by compressed-tensors' own code against transformers loading them with it,
transformers' fine-grained (block) FP8 layout, bitsandbytes' quantizers against its own
dequantization and matmul, whole tiny models against transformers, tensor-parallel splits, and
the configurations Sluice refuses."""

import json
from pathlib import Path

import pytest
import torch
from quant_reference import INTEGER_PATH_LOGITS_TOLERANCE, takes_integer_path
from safetensors.torch import load_file, save_file
from sluice_server.kernels import Kernels
from sluice_server.layers.linear import Linear, RowParallelLinear
from sluice_server.layers.tensor_parallel import ShardGroup
from sluice_server.models.loader import LoadedModel, ModelLoadError, load_model
from sluice_server.quant import CodeFormat
from sluice_server.quant.at_load import quantize_4bit, quantize_int8
from sluice_server.quant.checkpoint import (
    CheckpointQuantizationError,
    checkpoint_quantization,
)
from sluice_server.quant.fp8 import quantize_fp8, read_fp8
from test_awq_gptq import forward_logits

CPU = torch.device("cpu")
TOKENS = torch.tensor([[1, 17, 42, 99, 5, 64, 23, 7]])
AT_LOAD_METHODS = ["fp8", "bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4"]

fp8_checkpoints = pytest.importorskip("fp8_checkpoints")
bitsandbytes = pytest.importorskip("bitsandbytes")


def random_weight(out_features: int = 48, in_features: int = 256) -> torch.Tensor:
    generator = torch.Generator().manual_seed(out_features + in_features)
    return torch.randn(out_features, in_features, generator=generator) / 8


def assert_logits_match(
    loaded: LoadedModel, reference: torch.nn.Module, tolerance: float = 1e-4
) -> None:
    """Sluice's logits for every position of TOKENS equal the transformers model's."""
    with torch.no_grad():
        expected = reference(TOKENS).logits[0]
    got = forward_logits(loaded, TOKENS[0])
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def quantized_projections(loaded: LoadedModel) -> list[Linear]:
    return [m for m in loaded.model.modules() if isinstance(m, Linear) and m.quantized is not None]


@pytest.mark.parametrize("strategy", fp8_checkpoints.STRATEGIES)
def test_compressed_tensors_checkpoint_matches_transformers(
    save_tiny_model, compiled_kernels: Kernels, tmp_path: Path, strategy: str
) -> None:
    """transformers runs the checkpoint through compressed-tensors' own decompression."""
    from transformers import AutoModelForCausalLM

    source, _ = save_tiny_model("llama", tie_word_embeddings=False)
    fp8_checkpoints.write_fp8_checkpoint(source, tmp_path, strategy)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    loaded = load_model(tmp_path, torch.float32, CPU, compiled_kernels, quantize="fp8")
    projections = quantized_projections(loaded)
    assert len(projections) == 4 * 2  # qkv, o, gate_up and down of both layers; not the LM head
    assert {m.quantized.code_format for m in projections} == {CodeFormat.FLOAT8_E4M3}
    assert_logits_match(loaded, reference)


def test_static_input_scales_are_read_and_left_unused(
    save_tiny_model, compiled_kernels: Kernels, tmp_path: Path
) -> None:
    """On CPU the activations stay unquantized: the same weights with and without activation
    scales give the same logits."""
    source, _ = save_tiny_model("llama", tie_word_embeddings=False)
    static = fp8_checkpoints.write_fp8_checkpoint(source, tmp_path / "static", "channel", True)
    assert any(name.endswith("input_scale") for name in load_file(static / "model.safetensors"))
    weights_only = fp8_checkpoints.write_fp8_checkpoint(source, tmp_path / "weights", "channel")
    logits = [
        forward_logits(load_model(path, torch.float32, CPU, compiled_kernels), TOKENS[0])
        for path in (static, weights_only)
    ]
    assert torch.equal(*logits)


def test_fine_grained_fp8_checkpoint_matches_its_dequantized_weights(
    save_tiny_model, compiled_kernels: Kernels, tmp_path: Path
) -> None:
    """transformers' and DeepSeek's layout: per-block multipliers in `weight_scale_inv`."""
    source, model = save_tiny_model("llama", tie_word_embeddings=False)
    tensors = load_file(source / "model.safetensors")
    dense = {}
    for name in [n for n in tensors if n.endswith("proj.weight")]:
        weight = tensors[name]
        blocks = weight.reshape(weight.shape[0] // 32, 32, weight.shape[1] // 32, 32)
        scale = blocks.abs().amax((1, 3)) / 448
        expanded = scale.repeat_interleave(32, 0).repeat_interleave(32, 1)
        codes = (weight / expanded).to(torch.float8_e4m3fn)
        tensors[name], tensors[f"{name}_scale_inv"] = codes, scale
        dense[name] = codes.float() * expanded
    save_file(tensors, tmp_path / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": [32, 32],
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_model(tmp_path, torch.float32, CPU, compiled_kernels)
    assert len(quantized_projections(loaded)) == 4 * 2  # q/k/v and gate/up fused
    model.load_state_dict(dense, strict=False)
    assert_logits_match(loaded, model)


def test_fp8_at_load_matches_compressed_tensors_per_channel_quantization(
    save_tiny_model, compiled_kernels: Kernels, tmp_path: Path
) -> None:
    source, _ = save_tiny_model("llama", tie_word_embeddings=False)
    checkpoint = fp8_checkpoints.write_fp8_checkpoint(source, tmp_path, "channel")
    at_load = load_model(source, torch.float32, CPU, compiled_kernels, quantize="fp8")
    stored = load_model(checkpoint, torch.float32, CPU, compiled_kernels)
    pairs = zip(quantized_projections(at_load), quantized_projections(stored), strict=True)
    for ours, theirs in pairs:
        torch.testing.assert_close(
            ours.quantized.dequantize(), theirs.quantized.dequantize(), rtol=1e-6, atol=1e-7
        )


def test_fp8_scales_per_tensor_channel_group_and_block_are_read() -> None:
    codes = quantize_fp8(random_weight(64, 256)).codes.view(torch.float8_e4m3fn)
    values = codes.float()
    channels, groups, blocks = torch.rand(64), torch.rand(64, 4), torch.rand(2, 2)
    cases = [
        (torch.tensor(0.01), None, values * 0.01),
        (torch.tensor([0.01]), None, values * 0.01),
        (channels, None, values * channels[:, None]),
        (channels[:, None], None, values * channels[:, None]),
        (groups, None, values * groups.repeat_interleave(64, 1)),
        (blocks, (32, 128), values * blocks.repeat_interleave(32, 0).repeat_interleave(128, 1)),
    ]
    for scale, block, expected in cases:
        torch.testing.assert_close(read_fp8(codes, scale, block).dequantize(), expected)
    with pytest.raises(ValueError, match="does not fit"):
        read_fp8(codes, torch.rand(3, 5), (32, 128))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        read_fp8(codes.to(torch.float8_e5m2), torch.tensor(0.01), None)


def test_bitsandbytes_quantizers_match_its_dequantization_and_matmul(
    compiled_kernels: Kernels,
) -> None:
    functional = bitsandbytes.functional
    weight = random_weight()
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
    ops = compiled_kernels.ops
    codes, row_absmax, _ = functional.int8_vectorwise_quant(weight)
    int8 = quantize_int8(weight)
    torch.testing.assert_close(
        int8.dequantize(), functional.int8_vectorwise_dequant(codes, row_absmax)
    )
    for table in ("nf4", "fp4"):
        packed, state = functional.quantize_4bit(
            weight, blocksize=64, compress_statistics=False, quant_type=table
        )
        ours = quantize_4bit(weight, table)
        assert ours.code_format is CodeFormat.LEVELS4
        torch.testing.assert_close(ours.dequantize(), functional.dequantize_4bit(packed, state))
        # bitsandbytes' own 4-bit matmul (its CPU implementation) against our kernel.
        expected = bitsandbytes.matmul_4bit(x, packed.t(), quant_state=state)
        torch.testing.assert_close(ops.quantized_linear(x, ours, None), expected)


@pytest.mark.parametrize("method", AT_LOAD_METHODS)
def test_quantized_at_load_matches_transformers_on_the_dequantized_weights(
    save_tiny_model, compiled_kernels: Kernels, method: str
) -> None:
    source, model = save_tiny_model("llama", tie_word_embeddings=False)
    loaded = load_model(source, torch.float32, CPU, compiled_kernels, quantize=method)
    projections = quantized_projections(loaded)
    assert len(projections) == 4 * 2
    dense = {}
    for name, module in loaded.model.named_modules():
        if isinstance(module, Linear) and module.quantized is not None:
            dense[name] = module.quantized.dequantize()
    # Sluice fuses q/k/v and gate/up: split them back into transformers' projections.
    state = model.state_dict()
    for layer in range(2):
        prefix = f"model.layers.{layer}"
        qkv = dense[f"layers.{layer}.self_attn.qkv_proj"].split([64, 32, 32])
        gate_up = dense[f"layers.{layer}.feed_forward.gate_up_proj"].split([128, 128])
        parts = {
            "self_attn.q_proj": qkv[0],
            "self_attn.k_proj": qkv[1],
            "self_attn.v_proj": qkv[2],
            "self_attn.o_proj": dense[f"layers.{layer}.self_attn.o_proj"],
            "mlp.gate_proj": gate_up[0],
            "mlp.up_proj": gate_up[1],
            "mlp.down_proj": dense[f"layers.{layer}.feed_forward.down_proj"],
        }
        for part, tensor in parts.items():
            assert not torch.equal(state[f"{prefix}.{part}.weight"], tensor)  # rounded
            state[f"{prefix}.{part}.weight"] = tensor
    model.load_state_dict(state)
    # int8 codes take the compiled kernel's integer path, which rounds x to 16 bits.
    integer = any(takes_integer_path(p.quantized) for p in projections)
    assert_logits_match(loaded, model, INTEGER_PATH_LOGITS_TOLERANCE if integer else 1e-4)


@pytest.mark.parametrize("method", ["fp8", "bitsandbytes-nf4"])
def test_row_parallel_ranks_quantize_at_load_or_hold_cut_groups_unquantized(
    save_tiny_model, compiled_kernels: Kernels, method: str
) -> None:
    """Per-channel FP8 slices at any block of 32 input features. NF4's blocks of 64 are cut by a
    rank's 96 of down_proj's 192 input features, so that projection stays unquantized on each
    rank (o_proj's 64 are one block: its scales are per output feature and slice as FP8's)."""
    source, _ = save_tiny_model("llama", tie_word_embeddings=False, intermediate_size=192)
    whole = load_model(source, torch.float32, CPU, compiled_kernels, quantize=method).model
    ranks = [
        load_model(
            source, torch.float32, CPU, compiled_kernels, ShardGroup(r, 2, None), quantize=method
        ).model
        for r in range(2)
    ]
    for (name, layer), *parts in zip(
        whole.named_modules(), *(rank.modules() for rank in ranks), strict=True
    ):
        if not isinstance(layer, RowParallelLinear):
            continue
        width = layer.in_section.full // 2
        cut = method == "bitsandbytes-nf4" and name.endswith("down_proj")
        assert all((part.quantized is None) == cut for part in parts), name
        x = torch.randn(3, layer.in_section.full, generator=torch.Generator().manual_seed(0))
        partials = [
            Linear.forward(part, x[:, r * width : (r + 1) * width].contiguous())
            for r, part in enumerate(parts)
        ]
        if not cut:
            expected = Linear.forward(layer, x)
            torch.testing.assert_close(sum(partials), expected, rtol=1e-5, atol=1e-5)


def write_config(directory: Path, quantization: dict | None) -> dict:
    config = {"model_type": "llama"}
    if quantization is not None:
        config["quantization_config"] = quantization
    return config


def compressed_tensors_config(weights: dict, fmt: str = "float-quantized") -> dict:
    group = {"targets": ["Linear"], "weights": weights}
    return {"quant_method": "compressed-tensors", "format": fmt, "config_groups": {"g": group}}


@pytest.mark.parametrize(
    ("quantization", "requested", "message"),
    [
        ({"quant_method": "awq"}, "bitsandbytes-nf4", "bitsandbytes-nf4 conflicts"),
        ({"quant_method": "fp8"}, "gptq", "--quantize gptq conflicts"),
        ({"quant_method": "bitsandbytes"}, None, "with --quantize bitsandbytes-nf4"),
        (None, "eetq", "--quantize eetq: Sluice serves awq, gptq, fp8"),
        (
            compressed_tensors_config({"num_bits": 4, "type": "int"}, "pack-quantized"),
            None,
            "compressed-tensors' pack-quantized format is not supported",
        ),
        (
            compressed_tensors_config({"num_bits": 8, "type": "int"}, "naive-quantized"),
            None,
            "8-bit int weights are not supported",
        ),
    ],
)
def test_quantization_the_checkpoint_cannot_serve_is_refused(
    tmp_path: Path, quantization: dict | None, requested: str | None, message: str
) -> None:
    with pytest.raises(CheckpointQuantizationError, match=message):
        checkpoint_quantization(tmp_path, write_config(tmp_path, quantization), requested)


def test_fp8_settings_are_read(tmp_path: Path) -> None:
    plain = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    assert checkpoint_quantization(tmp_path, write_config(tmp_path, plain), "fp8").block == (
        128,
        128,
    )
    block = {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [64, 32]}
    found = checkpoint_quantization(
        tmp_path, write_config(tmp_path, compressed_tensors_config(block)), None
    )
    assert (found.method, found.bits, found.block) == ("fp8", 8, (64, 32))
    assert checkpoint_quantization(tmp_path, write_config(tmp_path, None), "fp8") is None


def test_a_malformed_fp8_scale_is_refused_by_name(save_tiny_model, tmp_path: Path) -> None:
    source, _ = save_tiny_model("llama", tie_word_embeddings=False)
    fp8_checkpoints.write_fp8_checkpoint(source, tmp_path, "channel")
    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight_scale"
    tensors[name] = tensors[name][:-1].contiguous()
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match="layers.1.mlp.up_proj"):
        load_model(tmp_path, torch.float32, CPU, Kernels.reference())
