"""Attention on CPU with Sluice's C++ kernels: decodes read K/V in place from the paged cache.

Keys are stored with each block transposed ([D, block_size]), which lets the decode kernel score
a block with plain vector multiply-adds. Prefill chunks use the reference backend's code:
prefill attention is matmul-bound and PyTorch's scaled_dot_product_attention runs it well.
"""

from types import ModuleType

import torch

from .backend import LayerKVCache
from .torch_backend import DecodeGroup, TorchAttentionBackend


class CompiledCpuAttentionBackend(TorchAttentionBackend):
    transposed_keys = True

    def __init__(self, kernels: ModuleType) -> None:
        self.kernels = kernels

    def write(
        self,
        cache: LayerKVCache,
        key: torch.Tensor,
        value: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        self.kernels.write_kv(cache.key, cache.value, key, value, slot_mapping)

    def attend_decodes(
        self, query: torch.Tensor, cache: LayerKVCache, decodes: DecodeGroup, scale: float
    ) -> torch.Tensor:
        return self.kernels.paged_decode_attention(
            query, cache.key, cache.value, decodes.block_tables, decodes.context_lens, scale
        )
