"""Sizing and allocating the paged KV cache."""

import math
from dataclasses import dataclass

import torch

from ..layers.attention import LayerKVCache
from ..memory import advise_huge_pages, available_host_memory
from ..models.loader import LoadedModel

# Without --kv-cache-memory: on CPU take this share of the memory the system reports available...
HOST_MEMORY_FRACTION = 0.25
# ...and on CUDA this share of the memory free after warmup, less the warmup's peak activations.
CUDA_MEMORY_FRACTION = 0.9

# --kv-cache-dtype's choices (TGI's names): 8-bit floats, half the bytes of a bfloat16 cache, so
# twice the tokens in the same memory and half the bytes a decode step reads back. Keys and values
# are stored divided by the checkpoint's scales where it has them (else as they are), saturating
# at the format's largest value (448 for e4m3, 57,344 for e5m2).
KV_CACHE_DTYPES = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    # The attention backend's key layout (see LayerKVCache).
    transposed_keys: bool
    # Each layer's (key, value) scales for an 8-bit cache (LayerKVCache); empty: all 1.
    scales: tuple[tuple[float, float], ...] = ()

    @classmethod
    def for_model(
        cls, loaded: LoadedModel, block_size: int, dtype: torch.dtype | None = None
    ) -> "KVCacheSpec":
        """The cache a loaded model needs, on its device, in `dtype` (default: the model's):
        this rank's share of the KV heads, and in 8 bits the checkpoint's scales."""
        config = loaded.config
        dtype = dtype or loaded.dtype
        return cls(
            num_layers=config.num_layers,
            block_size=block_size,
            num_kv_heads=loaded.shards.local_kv_heads(config.num_kv_heads),
            head_dim=config.head_dim,
            dtype=dtype,
            device=loaded.device,
            transposed_keys=loaded.kernels.attention.transposed_keys,
            scales=tuple(loaded.model.kv_cache_scales()) if dtype.itemsize == 1 else (),
        )

    @property
    def bytes_per_block(self) -> int:
        elements = (
            2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim
        )  # K and V
        return elements * self.dtype.itemsize

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def allocate(self, num_blocks: int) -> list[LayerKVCache]:
        shape = (self.num_kv_heads, num_blocks, self.block_size, self.head_dim)
        key_shape = (
            (self.num_kv_heads, num_blocks, self.head_dim, self.block_size)
            if self.transposed_keys
            else shape
        )
        # Zeros, not empty: padded slots are masked out of attention but still multiplied by a zero
        # weight, and uninitialised memory may hold NaN (0 * NaN = NaN).
        scales = self.scales or ((1.0, 1.0),) * self.num_layers
        return [
            LayerKVCache(self._zeros(key_shape), self._zeros(shape), key_scale, value_scale)
            for key_scale, value_scale in scales
        ]

    def _zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=self.dtype, device=self.device)
        if self.device.type == "cpu":
            advise_huge_pages(tensor)
        return tensor.zero_()  # Touching the pages after the advice gives them huge pages.


def default_cache_bytes(device: torch.device, warmup_peak_bytes: int, world_size: int) -> int:
    """Memory for one rank's KV cache when the user did not set --kv-cache-memory. Ranks on the
    CPU share the host's memory, so each takes its part of the host's share."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * CUDA_MEMORY_FRACTION) - warmup_peak_bytes
    return int(available_host_memory() * HOST_MEMORY_FRACTION) // world_size
