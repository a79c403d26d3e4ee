"""Writes FP8 checkpoints in compressed-tensors' format with compressed-tensors' own code: its
scheme and config classes, its `calculate_qparams` for the scales and its `ModelCompressor` for
the e4m3 codes, the checkpoint files and config.json's `quantization_config`. The scales come
from each weight's own range (what llm-compressor's min-max observer computes for weights).

    python server/tests/fp8_checkpoints.py SOURCE OUT {tensor,channel,block} [--static-input]

`--static-input` adds per-tensor activation scales, measured on one forward of random tokens.
"""

import argparse
import shutil
from pathlib import Path

import torch
from compressed_tensors import ModelCompressor
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
)
from compressed_tensors.quantization.utils import calculate_qparams, is_module_quantized
from compressed_tensors.utils import update_offload_parameter
from transformers import AutoModelForCausalLM

BLOCK = (32, 32)
STRATEGIES = ("tensor", "channel", "block")


def fp8_args(strategy: str) -> QuantizationArgs:
    block = list(BLOCK) if strategy == "block" else None
    return QuantizationArgs(
        num_bits=8,
        type="float",
        symmetric=True,
        dynamic=False,
        strategy=strategy,
        block_structure=block,
    )


def weight_range(weight: torch.Tensor, strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight's min and max, reduced to the scale's shape for `strategy`."""
    weight = weight.float()
    if strategy == "tensor":
        return weight.amin(), weight.amax()
    if strategy == "channel":
        return weight.amin(1, keepdim=True), weight.amax(1, keepdim=True)
    rows, columns = BLOCK
    if weight.shape[0] % rows or weight.shape[1] % columns:
        raise ValueError(f"weight {tuple(weight.shape)} does not split into {BLOCK} blocks")
    blocks = weight.reshape(weight.shape[0] // rows, rows, weight.shape[1] // columns, columns)
    return blocks.amin((1, 3)), blocks.amax((1, 3))


@torch.no_grad()
def input_ranges(model: torch.nn.Module) -> dict[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """Each Linear's input min and max over one forward of random tokens."""
    ranges: dict[torch.nn.Module, tuple[torch.Tensor, ...]] = {}

    def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].float()
        low, high = ranges.get(module, (x.min(), x.max()))
        ranges[module] = (torch.minimum(low, x.min()), torch.maximum(high, x.max()))

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    hooks = [m.register_forward_pre_hook(record) for m in linears]
    tokens = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.manual_seed(0))
    model(tokens)
    for hook in hooks:
        hook.remove()
    return ranges


@torch.no_grad()
def write_fp8_checkpoint(
    source: Path, out: Path, strategy: str, static_input: bool = False
) -> Path:
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto", device_map="cpu").eval()
    activations = input_ranges(model) if static_input else {}
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=fp8_args(strategy),
        input_activations=fp8_args("tensor") if static_input else None,
        # Weight-only FP8 would be labelled naive-quantized, the same values under another name.
        format="float-quantized",
    )
    apply_quantization_config(
        model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"])
    )
    for module in model.modules():
        if not is_module_quantized(module):
            continue
        args = module.quantization_scheme.weights
        scale, zero = calculate_qparams(*weight_range(module.weight, strategy), args)
        update_offload_parameter(module, "weight_scale", scale.to(module.weight_scale.dtype))
        update_offload_parameter(
            module, "weight_zero_point", zero.to(module.weight_zero_point.dtype)
        )
        if module in activations:
            input_args = module.quantization_scheme.input_activations
            scale, zero = calculate_qparams(*activations[module], input_args)
            update_offload_parameter(module, "input_scale", scale.to(module.input_scale.dtype))
            update_offload_parameter(
                module, "input_zero_point", zero.to(module.input_zero_point.dtype)
            )
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    for pattern in (
        "tokenizer*",
        "special_tokens_map.json",
        "chat_template*",
        "generation_config.json",
    ):
        for path in Path(source).glob(pattern):
            shutil.copy2(path, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("strategy", choices=STRATEGIES)
    parser.add_argument("--static-input", action="store_true")
    args = parser.parse_args()
    write_fp8_checkpoint(args.source, args.out, args.strategy, args.static_input)


if __name__ == "__main__":
    main()
