"""Paged attention: the backend interface and its implementations."""

from .backend import (
    AttentionBackend,
    AttentionMetadata,
    AttentionParams,
    LayerKVCache,
    SequenceChunk,
)
from .cpu_backend import CompiledCpuAttentionBackend, CompiledCpuAttentionMetadata
from .torch_backend import TorchAttentionBackend

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "AttentionParams",
    "CompiledCpuAttentionBackend",
    "CompiledCpuAttentionMetadata",
    "LayerKVCache",
    "SequenceChunk",
    "TorchAttentionBackend",
]
