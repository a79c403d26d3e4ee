"""Paged attention: the backend interface and its implementations."""

from .backend import AttentionBackend, AttentionMetadata, LayerKVCache, SequenceChunk
from .torch_backend import TorchAttentionBackend

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "LayerKVCache",
    "SequenceChunk",
    "TorchAttentionBackend",
]
