"""A decoder's self-attention block: projections, rotary embedding, paged attention.

q, k and v read the same input, so they run as one fused projection; checkpoints that store them
apart are concatenated at load, those that store them fused (Phi-3's `qkv_proj`) load as is.
Across tensor-parallel ranks each holds a share of the query heads and the KV heads they read
(see tensor_parallel.py): the projection in is column-parallel, the one out row-parallel.
"""

from dataclasses import dataclass

import torch
from torch import nn

from ..weights import CheckpointWeights
from .attention import AttentionMetadata, AttentionParams, LayerKVCache
from .linear import ColumnParallelLinear, RowParallelLinear
from .norm import RMSNorm
from .runtime import LayerRuntime


@dataclass(frozen=True)
class SelfAttentionConfig:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    params: AttentionParams
    qkv_bias: bool = False
    o_bias: bool = False
    # Each query and key head is RMS-normalised before its rotation (Qwen3, Gemma 3) with this
    # epsilon; None: no such norm.
    qk_norm_eps: float | None = None
    # Added to the q/k norm weights at load (Gemma's norms store w - 1).
    norm_weight_offset: float = 0.0


def kv_cache_scale(weights: CheckpointWeights, names: list[str]) -> float:
    """The first of `names` the checkpoint holds, as the scale an 8-bit KV cache stores keys or
    values divided by; 1 where it holds none. Of a scale per head the layer takes the largest,
    with which nothing saturates that would not with its own."""
    for name in names:
        if name not in weights:
            continue
        scales = weights.stored(name).float()
        if not (scales.isfinite().all() and (scales > 0).all()):
            raise ValueError(f"{name} holds {scales.tolist()}: KV cache scales must be positive")
        return float(scales.max().item())
    return 1.0


class SelfAttention(nn.Module):
    def __init__(self, config: SelfAttentionConfig, runtime: LayerRuntime) -> None:
        super().__init__()
        self.config = config
        # What an 8-bit KV cache stores this layer's keys and values divided by (load()).
        self.key_scale = 1.0
        self.value_scale = 1.0
        self.backend = runtime.attention
        self.ops = runtime.ops
        query = runtime.shards.heads(config.num_heads, config.head_dim)
        key_value = runtime.shards.kv_heads(config.num_kv_heads, config.head_dim)
        # This rank's heads and their sizes in features.
        self.num_heads = query.size // config.head_dim
        self.num_kv_heads = key_value.size // config.head_dim
        self.q_size = query.size
        self.kv_size = key_value.size
        self.qkv_proj = ColumnParallelLinear(
            config.hidden_size, [query, key_value, key_value], config.qkv_bias, runtime
        )
        self.o_proj = RowParallelLinear(query, config.hidden_size, config.o_bias, runtime)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if config.qk_norm_eps is not None:
            eps, offset = config.qk_norm_eps, config.norm_weight_offset
            self.q_norm = RMSNorm(config.head_dim, eps, runtime, offset)
            self.k_norm = RMSNorm(config.head_dim, eps, runtime, offset)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerKVCache,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        config = self.config
        num_tokens = hidden.shape[0]
        query_key, value = self.qkv_proj(hidden).split(
            [self.q_size + self.kv_size, self.kv_size], dim=-1
        )
        heads = self._query_key_heads(query_key)
        # Queries and keys rotate by the same angles: one rotation over both, in place.
        self.ops.rotary_(heads, cos, sin)
        query, key = heads.split([self.num_heads, self.num_kv_heads], dim=1)
        value = value.view(num_tokens, self.num_kv_heads, config.head_dim)
        self.backend.write(cache, key, value, metadata.slot_mapping)
        attended = self.backend.attend(query, key, value, cache, metadata, config.params)
        return self.o_proj(attended.view(num_tokens, self.q_size))

    def _query_key_heads(self, query_key: torch.Tensor) -> torch.Tensor:
        """[T, num_heads + num_kv_heads, head_dim], each head normalised where the model says."""
        config = self.config
        num_tokens = query_key.shape[0]
        if self.q_norm is None or self.k_norm is None:
            return query_key.view(num_tokens, self.num_heads + self.num_kv_heads, -1)
        query, key = query_key.split([self.q_size, self.kv_size], dim=-1)
        normed_query = self.q_norm(query.reshape(-1, config.head_dim))
        normed_key = self.k_norm(key.reshape(-1, config.head_dim))
        return torch.cat(
            (
                normed_query.view(num_tokens, self.num_heads, -1),
                normed_key.view(num_tokens, self.num_kv_heads, -1),
            ),
            dim=1,
        )

    def load(self, weights: CheckpointWeights, prefix: str) -> None:
        fused = f"{prefix}.qkv_proj"
        if f"{fused}.weight" in weights:
            self.qkv_proj.load(weights, [fused])
        else:
            self.qkv_proj.load(weights, [f"{prefix}.{name}_proj" for name in ("q", "k", "v")])
        self.o_proj.load(weights, [f"{prefix}.o_proj"])
        # The scales an 8-bit KV cache was calibrated with, where the checkpoint has them:
        # compressed-tensors' names, one scale for both, AutoFP8's.
        self.key_scale = kv_cache_scale(
            weights, [f"{prefix}.k_scale", f"{prefix}.kv_scale", f"{prefix}.k_proj.output_scale"]
        )
        self.value_scale = kv_cache_scale(
            weights, [f"{prefix}.v_scale", f"{prefix}.kv_scale", f"{prefix}.v_proj.output_scale"]
        )
        if self.q_norm is not None and self.k_norm is not None:
            self.q_norm.load(weights.get(f"{prefix}.q_norm.weight"))
            self.k_norm.load(weights.get(f"{prefix}.k_norm.weight"))
