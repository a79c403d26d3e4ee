"""What every layer of one model shares: the attention backend and ops it runs with, its dtype
and its device."""

from dataclasses import dataclass

import torch

from .attention import AttentionBackend
from .ops import Ops


@dataclass(frozen=True)
class LayerRuntime:
    attention: AttentionBackend
    ops: Ops
    dtype: torch.dtype
    device: torch.device
