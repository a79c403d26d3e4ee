"""What keeping the weights in huge pages is worth: decode steps of the model as the shard loads
it (its weights gathered into one allocation in 2 MiB pages, see
sluice_server.memory.gather_into_huge_pages) against a second copy whose weights were moved back
to an allocation each (4 KiB pages, as before the shard gathered them), steps taking turns in one
process so that a drifting machine moves both alike.

    python benchmark/weight_pages.py --model ~/.cache/sluice/models/SmolLM2-135M-Instruct \
        --batch 1 32

With `--gguf-file FILE` (the file --model was converted from), its quantized projections, as
`--quantize gguf` serves them.

Prints one JSON line per batch size: each copy's median step and the ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from profile_step import BLOCK_SIZE, admit_batch, decode
from sluice_server.engine.step import StepExecutor
from sluice_server.kernels import select_kernels
from sluice_server.models.loader import load_model, weight_tensors


def in_small_pages(model: torch.nn.Module) -> int:
    """Moves each weight tensor back to an allocation of its own; returns their bytes."""
    moved: dict[int, torch.Tensor] = {}
    for tensor in weight_tensors(model):
        if tensor.layout == torch.strided and tensor.numel() > 0:
            moved.setdefault(tensor.data_ptr(), tensor)
    with torch.no_grad():
        for tensor in moved.values():
            tensor.set_(tensor.clone())
    return sum(t.numel() * t.element_size() for t in moved.values())


def anon_huge_page_bytes() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--gguf-file", type=Path, help="serve this GGUF file's quantized weights")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()

    device = torch.device("cpu")
    kernels = select_kernels("auto", device, Path.home() / ".cache" / "sluice" / "kernels")
    dtype = getattr(torch, args.dtype)
    gguf_file = args.gguf_file.expanduser() if args.gguf_file else None
    huge = load_model(args.model.expanduser(), dtype, device, kernels, gguf_file=gguf_file)
    huge_page_bytes = anon_huge_page_bytes()
    small = load_model(args.model.expanduser(), dtype, device, kernels, gguf_file=gguf_file)
    moved = in_small_pages(small.model)
    print(
        json.dumps(
            {
                "weight_bytes_moved_back": moved,
                "anon_huge_page_bytes_after_first_load": huge_page_bytes,
            }
        ),
        flush=True,
    )
    max_new = args.steps + 16
    for batch in args.batch:
        executors = {}
        for label, loaded in (("huge pages", huge), ("4 KiB pages", small)):
            executors[label] = StepExecutor(loaded, BLOCK_SIZE, None)
            admit_batch(executors[label], batch, args.prompt_tokens, max_new)
        result = decode(executors, batch, args.steps)
        each = result["step_ms_each"]
        ratio = each["4 KiB pages"] / each["huge pages"]
        print(json.dumps({"batch": batch, "step_ms_each": each, "speedup": round(ratio, 3)}))
        del executors


if __name__ == "__main__":
    main()
