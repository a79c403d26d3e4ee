"""Tensor parallelism on CPU: a model split across 2 and 4 ranks (separate processes, gloo)
gives the logits of the unsplit model, through the paged cache and the compiled CPU kernels on
every rank; and a model that does not split across a shard count says which counts work."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import sluice_server
import torch
from sluice_server.kernels import Kernels
from sluice_server.layers.tensor_parallel import ShardGroup
from sluice_server.models.loader import ModelLoadError, load_model, supported_shard_counts
from tensor_parallel_worker import run_steps

TOLERANCE = 1e-5
WORKER = Path(__file__).with_name("tensor_parallel_worker.py")

# (model_type, overrides, world sizes). Four query and two KV heads: at 4 ranks each KV head is
# replicated on two ranks. A vocabulary of 131 leaves the last rank's share padded.
SPLIT_MODELS = {
    "llama": ("llama", {"tie_word_embeddings": False, "vocab_size": 131}, (2, 4)),
    "llama-tied": ("llama", {"tie_word_embeddings": True}, (2,)),
    "qwen2": ("qwen2", {"tie_word_embeddings": False}, (2, 4)),
    "qwen3-moe": (
        "qwen3_moe",
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
        (2,),
    ),
    "gemma2": ("gemma2", {"head_dim": 16, "attn_logit_softcapping": 5.0}, (2,)),
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_split(model_dir: Path, world_size: int, out_dir: Path) -> list[torch.Tensor]:
    """Every rank's logits from `run_steps` on the model split `world_size` ways."""
    port = _free_port()
    # The ranks run the sluice_server this test imported.
    env = {**os.environ, "PYTHONPATH": str(Path(sluice_server.__file__).parents[1])}
    outputs = [out_dir / f"rank-{rank}.pt" for rank in range(world_size)]
    ranks = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                str(model_dir),
                str(output),
                f"--rank={rank}",
                f"--world-size={world_size}",
                f"--port={port}",
            ],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, output in enumerate(outputs)
    ]
    for rank, process in enumerate(ranks):
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"rank {rank} failed:\n{stderr}"
    return [torch.load(output) for output in outputs]


@pytest.mark.parametrize(
    ("variant", "world_size"),
    [(name, size) for name, (_, _, sizes) in SPLIT_MODELS.items() for size in sizes],
)
def test_split_model_matches_one_shard(
    variant: str, world_size: int, save_tiny_model, compiled_kernels: Kernels, tmp_path: Path
) -> None:
    model_type, overrides, _ = SPLIT_MODELS[variant]
    model_dir, _ = save_tiny_model(model_type, **overrides)
    whole = load_model(model_dir, torch.float32, torch.device("cpu"), compiled_kernels)
    expected = run_steps(whole)
    for rank, logits in enumerate(_run_split(model_dir, world_size, tmp_path)):
        assert logits.shape == expected.shape
        error = (logits - expected).abs().max().item()
        assert error < TOLERANCE, f"rank {rank} of {world_size}: max error {error}"


def test_shard_counts_follow_heads_and_intermediate_size() -> None:
    # The default model's shape: 9 query heads, 3 KV heads, 1,536 intermediate features.
    config = {"num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536}
    assert supported_shard_counts(config) == [1, 3]
    config = {"num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336}
    assert supported_shard_counts(config) == [1, 2, 4, 8, 16, 32]


def test_a_count_that_does_not_split_the_heads_is_refused(save_tiny_model) -> None:
    model_dir, _ = save_tiny_model("llama", num_attention_heads=4, num_key_value_heads=2)
    # Loading alone runs no collective: a group without processes behind it is enough.
    three_ranks = ShardGroup(rank=0, world_size=3)
    with pytest.raises(ModelLoadError, match=r"num_attention_heads = 4 .* 1, 2, 4 shards"):
        load_model(model_dir, torch.float32, torch.device("cpu"), Kernels.reference(), three_ranks)
