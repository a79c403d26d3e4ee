"""What every layer of one model shares: the attention backend and ops it runs with, its dtype,
its device, and the tensor-parallel group it is split across."""

from dataclasses import dataclass

import torch

from .attention import AttentionBackend
from .ops import Ops
from .tensor_parallel import SINGLE_SHARD, ShardGroup


@dataclass(frozen=True)
class LayerRuntime:
    attention: AttentionBackend
    ops: Ops
    dtype: torch.dtype
    device: torch.device
    shards: ShardGroup = SINGLE_SHARD
