"""The sampler's time per step (`sluice_server.sampling.sample`) for a batch of rows with the same
parameters, on the model's real logits.

The logits are the default model's (transformers, bfloat16) at consecutive positions of
benchmark/data/perplexity.txt, so each row's distribution has a language model's shape: a few
likely tokens and a long tail. The sampler runs with the compiled kernels' passes over the
vocabulary (`compiled`, where they build) and with the PyTorch ones (`pytorch`). With
`--against REV`, the sampler as it was at that git revision is timed too, its source with the
compiled kernels built from that revision's, all of them alternating call by call.

    python benchmark/sampler.py --rows 1 8 32 --against HEAD~1 [--skip-pytorch]
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "server"))

from quantized_kernel import kernels_at_revision
from sluice_server.kernels.cpu_features import CpuFeatures
from sluice_server.kernels import Kernels, select_kernels
from sluice_server.layers.ops import CompiledCpuOps
from sluice_server.sampling import sampler

SAMPLER_SOURCE = "server/sluice_server/sampling/sampler.py"
DEFAULT_MODEL = Path.home() / ".cache" / "sluice" / "models" / "SmolLM2-135M-Instruct"

# (name, parameters): what users send; OpenAI's API samples at temperature 1 by default.
SETTINGS = {
    "greedy": sampler.SamplingParams(),
    "temperature 1": sampler.SamplingParams(do_sample=True),
    "top_p 0.9": sampler.SamplingParams(do_sample=True, top_p=0.9),
    "temperature 0.7, top_p 0.8": sampler.SamplingParams(
        do_sample=True, temperature=0.7, top_p=0.8
    ),
    "top_k 50, top_p 0.95": sampler.SamplingParams(do_sample=True, top_k=50, top_p=0.95),
    "min_p 0.05": sampler.SamplingParams(do_sample=True, min_p=0.05),
    "typical_p 0.9": sampler.SamplingParams(do_sample=True, typical_p=0.9),
}


def model_logits(model_dir: Path, positions: int) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    text = (REPO / "benchmark" / "data" / "perplexity.txt").read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :positions]
    with torch.no_grad():
        return model(ids).logits[0]


def sampler_at_revision(revision: str, work: Path) -> ModuleType:
    """The sampler module as it was at `revision`, imported from a copy under `work`."""
    path = work / "sampler_baseline.py"
    path.write_text(
        subprocess.run(
            ["git", "-C", str(REPO), "show", f"{revision}:{SAMPLER_SOURCE}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    spec = importlib.util.spec_from_file_location("sampler_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up while the module runs.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def time_ms(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds per call of each, the calls alternating."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call()
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: round(statistics.median(values), 3) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--against", help="also time the sampler at this git revision")
    parser.add_argument(
        "--skip-pytorch",
        action="store_true",
        help="leave out the PyTorch passes (their large temporaries, freed between calls, can "
        "leave the next call to fault its memory in again)",
    )
    args = parser.parse_args()

    kernels = select_kernels(
        "auto", torch.device("cpu"), Path.home() / ".cache" / "sluice" / "kernels"
    )
    logits = model_logits(args.model.expanduser(), max(args.rows))
    # label -> (sampler module, what its sample() takes after the rows)
    samplers: dict[str, tuple[ModuleType, object]] = {}
    if not args.skip_pytorch:
        samplers["pytorch"] = (sampler, Kernels.reference().ops)
    if kernels.compiled:
        samplers["compiled"] = (sampler, kernels.ops)
    if args.against:
        work = Path(tempfile.mkdtemp(prefix="sampler-"))
        module = sampler_at_revision(args.against, work)
        ops = kernels.ops
        if kernels.compiled:
            ops = CompiledCpuOps(kernels_at_revision(args.against, work), CpuFeatures.detect())
        # Before the sampler took the ops, it took the greedy pick alone.
        takes_ops = "ops" in inspect.signature(module.sample).parameters
        samplers[args.against] = (module, ops if takes_ops else ops.argmax_logprob)
    print(json.dumps({"vocab": logits.shape[-1], "compiled_kernels": kernels.compiled}))
    for rows in args.rows:
        for name, params in SETTINGS.items():
            calls = {}
            for label, (module, ops) in samplers.items():
                sampling_rows = [
                    module.SamplingRow(
                        module.SamplingParams(**{**params.__dict__, "seed": index}), [1, 2, 3], 3
                    )
                    for index in range(rows)
                ]
                calls[label] = partial(module.sample, logits[:rows], sampling_rows, ops)
            record = {"rows": rows, "parameters": name}
            record.update({f"{label}_ms": ms for label, ms in time_ms(calls, args.repeats).items()})
            print(json.dumps(record))


if __name__ == "__main__":
    main()
