"""One rank of a tensor-parallel run for test_tensor_parallel.py, started as its own process:
loads its slice of a model with the compiled CPU kernels, runs `run_steps` and saves the logits.

    python tensor_parallel_worker.py MODEL_DIR OUT_FILE --rank R --world-size N --port P
"""

import argparse
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from sluice_server.engine.kv_cache import KVCacheSpec
from sluice_server.engine.step import ForwardChunk, run_forward
from sluice_server.kernels import Kernels
from sluice_server.layers.tensor_parallel import ShardGroup
from sluice_server.models.loader import LoadedModel, load_model

KERNEL_CACHE_DIR = Path.home() / ".cache" / "sluice" / "kernels"
BLOCK_SIZE = 4
PROMPTS = ([5, 17, 3, 99, 42, 8, 61, 23, 77, 12, 30], [64, 9, 120, 33, 7, 81, 54])
DECODE_STEPS = 4


def run_steps(loaded: LoadedModel) -> torch.Tensor:
    """A batch of two prompts through scattered blocks of the paged cache, then decode steps of
    both, each continuing with its greedy token: every sampling row's logits, stacked."""
    cache = KVCacheSpec.for_model(loaded, BLOCK_SIZE).allocate(16)
    tables = ([9, 3, 14, 0], [11, 2, 7, 5])
    sequences = [list(prompt) for prompt in PROMPTS]
    chunks = [ForwardChunk(tokens, 0, table, True) for tokens, table in zip(sequences, tables)]
    all_logits = []
    for _ in range(DECODE_STEPS + 1):
        logits = run_forward(loaded, cache, chunks).logits
        all_logits.append(logits)
        for tokens, row in zip(sequences, logits.argmax(dim=-1).tolist()):
            tokens.append(row)
        chunks = [
            ForwardChunk(tokens[-1:], len(tokens) - 1, table, True)
            for tokens, table in zip(sequences, tables)
        ]
    return torch.cat(all_logits)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out_file", type=Path)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)  # Up to four ranks share the test machine's cores.
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{args.port}",
        rank=args.rank,
        world_size=args.world_size,
        timeout=timedelta(seconds=60),
    )
    shards = ShardGroup(args.rank, args.world_size, dist.group.WORLD)
    kernels = Kernels.compiled_cpu(KERNEL_CACHE_DIR)
    loaded = load_model(args.model_dir, torch.float32, torch.device("cpu"), kernels, shards)
    torch.save(run_steps(loaded), args.out_file)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
