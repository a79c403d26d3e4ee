"""Paged attention: the backend interface and its implementations."""

from .backend import (
    AttentionBackend,
    AttentionMetadata,
    AttentionParams,
    LayerKVCache,
    SequenceChunk,
)
from .cpu_backend import CompiledCpuAttentionBackend
from .torch_backend import TorchAttentionBackend

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "AttentionParams",
    "CompiledCpuAttentionBackend",
    "LayerKVCache",
    "SequenceChunk",
    "TorchAttentionBackend",
]
