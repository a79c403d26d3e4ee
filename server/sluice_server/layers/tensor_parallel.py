"""Tensor parallelism: which slice of each layer a rank holds, and the collectives that join the
ranks' partial results.

Every rank runs the whole model on its slice of each layer (the Megatron split). Projections that
fan out (q/k/v, gate/up, the LM head) split their output features: column-parallel, no
communication. Projections that fan back in (o, down) split their input features: row-parallel,
each rank computes a partial sum of the output and one all-reduce adds them up. So each attention
block and each MLP costs one all-reduce. Attention heads split with q/k/v; when there are fewer KV
heads than ranks, each KV head is replicated on the ranks whose query heads read it.

One shard is the same code with a group of one, whose collectives do nothing.
"""

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Section:
    """Entries [start, start + size) of a dimension that has `full` entries: the part of it one
    rank holds. Entries at or past `full` are padding (the vocabulary's last rank) and stay zero."""

    full: int
    start: int
    size: int

    @classmethod
    def whole(cls, full: int) -> "Section":
        """All of a dimension: what a replicated layer holds."""
        return cls(full, 0, full)

    @property
    def stop(self) -> int:
        return self.start + self.size

    @property
    def is_whole(self) -> bool:
        return (self.start, self.size) == (0, self.full)

    @property
    def stored_size(self) -> int:
        """How many of the rank's entries exist in the checkpoint (the rest is padding)."""
        return max(0, min(self.stop, self.full) - self.start)


class ShardingError(ValueError):
    """The model does not split across this many ranks; the message says what does."""


@dataclass(frozen=True)
class ShardGroup:
    """This rank's place in the tensor-parallel group, and the group's collectives."""

    rank: int = 0
    world_size: int = 1
    # The group of all ranks (ranks are numbered as in it); None for a single shard, whose
    # collectives are no-ops.
    process_group: dist.ProcessGroup | None = None

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def even(self, full: int, what: str) -> Section:
        """An equal share of a dimension that must divide evenly (intermediate features)."""
        if full % self.world_size:
            raise ShardingError(f"{what} = {full} does not split across {self.world_size} shards")
        size = full // self.world_size
        return Section(full, self.rank * size, size)

    def padded(self, full: int) -> Section:
        """An equal share rounded up, the last rank's padded (the vocabulary)."""
        size = -(-full // self.world_size)
        return Section(full, self.rank * size, size)

    def heads(self, num_heads: int, head_dim: int) -> Section:
        """This rank's query heads, as features."""
        heads = self.even(num_heads, "num_attention_heads")
        return Section(num_heads * head_dim, heads.start * head_dim, heads.size * head_dim)

    def local_kv_heads(self, num_kv_heads: int) -> int:
        return max(1, num_kv_heads // self.world_size)

    def kv_heads(self, num_kv_heads: int, head_dim: int) -> Section:
        """This rank's KV heads, as features: an equal share, or, with fewer KV heads than
        ranks, the one KV head this rank's query heads are grouped with."""
        if num_kv_heads >= self.world_size:
            heads = self.even(num_kv_heads, "num_key_value_heads")
            first = heads.start
        elif self.world_size % num_kv_heads:
            raise ShardingError(
                f"num_key_value_heads = {num_kv_heads} neither divides nor is divided by "
                f"{self.world_size} shards"
            )
        else:
            first = self.rank // (self.world_size // num_kv_heads)
        size = self.local_kv_heads(num_kv_heads)
        return Section(num_kv_heads * head_dim, first * head_dim, size * head_dim)

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums `tensor` over the ranks, in place."""
        if self.process_group is not None:
            dist.all_reduce(tensor, group=self.process_group)
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """The ranks' tensors side by side along the last dimension, rank 0 first."""
        if self.process_group is None:
            return tensor
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor, group=self.process_group)
        return torch.cat(parts, dim=-1)

    def broadcast_from_first(self, values: list[int], device: torch.device) -> list[int]:
        """Rank 0's values on every rank: the sampled tokens, so that every rank's copy of a
        sequence continues with the same token whatever its own random draw was."""
        if self.process_group is None:
            return values
        tensor = torch.tensor(values, dtype=torch.long, device=device)
        dist.broadcast(tensor, src=0, group=self.process_group)
        return tensor.tolist()


SINGLE_SHARD = ShardGroup()


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of one model meet (torch.distributed's TCP store on rank 0's host), as the
    launcher sets it in RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int
    # A collective that cannot complete (a rank died or hangs) fails after this.
    timeout: timedelta


def join_group(rendezvous: Rendezvous, device: torch.device) -> ShardGroup:
    """Joins the process group of all ranks (gloo on CPU, NCCL on CUDA); waits for every rank."""
    if rendezvous.world_size == 1:
        return SINGLE_SHARD
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://{rendezvous.master_addr}:{rendezvous.master_port}",
        rank=rendezvous.rank,
        world_size=rendezvous.world_size,
        timeout=rendezvous.timeout,
    )
    return ShardGroup(rendezvous.rank, rendezvous.world_size, dist.group.WORLD)
