"""How much an 8-bit KV cache rounds the keys and values a model computes, stored as they are
(what `--kv-cache-dtype` does) and scaled first so that each layer's largest magnitude maps to
the format's largest value (what a calibrated per-tensor scale would do).

Runs the model in transformers on the first `--tokens` tokens of the perplexity text, takes each
layer's key and value projections' outputs, and reports per format the relative error
|round(x) - x| / |x| (Frobenius norms), averaged over layers, each way:

    python benchmark/kv_cache_rounding.py
    python benchmark/kv_cache_rounding.py --model DIR --tokens 1024
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "server"))

from sluice_server.engine.kv_cache import KV_CACHE_DTYPES

DEFAULT_MODEL = Path.home() / ".cache" / "sluice" / "models" / "SmolLM2-135M-Instruct"


def projections_outputs(model_dir: Path, tokens: int) -> dict[str, list[torch.Tensor]]:
    """Every layer's k_proj and v_proj outputs on the text's first `tokens` tokens, float32."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    text = (BENCH / "data" / "perplexity.txt").read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    outputs: dict[str, list[torch.Tensor]] = {"keys": [], "values": []}
    for layer in model.model.layers:
        attention = layer.self_attn
        for name, projection in (("keys", attention.k_proj), ("values", attention.v_proj)):
            projection.register_forward_hook(
                lambda _module, _inputs, out, kept=outputs[name]: kept.append(out.detach())
            )
    with torch.no_grad():
        model.eval()(ids)
    return outputs


def relative_error(rows: torch.Tensor, dtype: torch.dtype, scale: float) -> float:
    largest = torch.finfo(dtype).max
    rounded = (rows / scale).clamp(-largest, largest).to(dtype).float() * scale
    return ((rounded - rows).norm() / rows.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    outputs = projections_outputs(args.model.expanduser(), args.tokens)
    result: dict[str, dict[str, dict[str, float]]] = {}
    for name, layers in outputs.items():
        result[name] = {}
        for format_name, dtype in KV_CACHE_DTYPES.items():
            largest = torch.finfo(dtype).max
            as_stored = [relative_error(rows, dtype, 1.0) for rows in layers]
            scaled = [
                relative_error(rows, dtype, rows.abs().max().item() / largest) for rows in layers
            ]
            result[name][format_name] = {
                "as_stored": round(sum(as_stored) / len(as_stored), 4),
                "scaled_to_layer_max": round(sum(scaled) / len(scaled), 4),
            }
    print(json.dumps({"model": str(args.model), "tokens": args.tokens, "relative_error": result}))


if __name__ == "__main__":
    main()
