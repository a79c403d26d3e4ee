"""How much rounding the activations costs a quantized projection, on a real model's activations.

The integer path of the quantized CPU kernel (server/sluice_server/kernels/csrc/
linear_quantized.cpp) multiplies integer codes by each row of activations rounded to integers per
run of features, at a scale of the run's largest magnitude: 12 bits per 32 features for 4-bit
codes, 16 bits per 16 for 8-bit codes. This script runs `transformers`' float32 model over the
first `--tokens` tokens of the repository's perplexity text, takes the input of every decoder
projection, and reports each rounding's relative error of the projection's output
(||x' W^T - x W^T|| / ||x W^T||, in float64, W the model's own weight) beside rounding the
activations to bfloat16, which is what a bfloat16 model multiplies.

    python benchmark/activation_rounding.py
    python benchmark/activation_rounding.py --model DIR --tokens 512
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = Path.home() / ".cache" / "sluice" / "models" / "SmolLM2-135M-Instruct"
TEXT = REPO / "benchmark" / "data" / "perplexity.txt"


def rounded_to_integers(x: torch.Tensor, run: int, largest: int) -> torch.Tensor:
    """x rounded per run of `run` features to integers of at most `largest` in magnitude."""
    runs = x.float().view(x.shape[0], -1, run)
    scale = runs.abs().amax(-1, keepdim=True) / largest
    rounded = torch.round(runs * torch.where(scale > 0, 1 / scale, 0)) * scale
    return rounded.reshape(x.shape)


ROUNDINGS = {
    "int16 per 16 (8-bit codes)": lambda x: rounded_to_integers(x, 16, 32767),
    "int12 per 32 (4-bit codes)": lambda x: rounded_to_integers(x, 32, 2047),
    "int8 per 32": lambda x: rounded_to_integers(x, 32, 127),
    "bfloat16": lambda x: x.bfloat16(),
}


def projection_inputs(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each decoder projection's input over the tokens, [tokens, in_features]."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:

            def keep(_module: torch.nn.Module, args: tuple, name: str = name) -> None:
                inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1])

            hooks.append(module.register_forward_pre_hook(keep))
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    ids = tokenizer(TEXT.read_text(), return_tensors="pt").input_ids[:, : args.tokens]
    inputs = projection_inputs(model, ids)
    modules = dict(model.named_modules())
    errors: dict[str, list[float]] = {name: [] for name in ROUNDINGS}
    for name, x in inputs.items():
        weight = modules[name].weight.double()
        exact = x.double() @ weight.T
        for rounding, round_x in ROUNDINGS.items():
            error = (round_x(x).double() @ weight.T - exact).norm() / exact.norm()
            errors[rounding].append(error.item())
    print(
        json.dumps(
            {
                "model": args.model.name,
                "tokens": ids.shape[1],
                "projections": len(inputs),
                "relative_output_error": {
                    rounding: {"mean": sum(e) / len(e), "max": max(e)}
                    for rounding, e in errors.items()
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
