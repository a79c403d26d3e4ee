"""A model's decoder layers run as one call into the compiled CPU kernels.

Layer by layer, Python spends about a dozen module calls, views and kernel calls per layer
around the kernels' arithmetic, 80-200 µs a layer on a small CPU core: at one sequence decoding,
a fifth to a third of the step. The compiled stack (kernels/csrc/decoder.cpp) makes the same
kernel calls in the same order from C++ (a step of more than 1,024 rows has its MLP run on chunks
of rows, which keeps them in the caches and gives each row the same bits), so a model gives
bitwise the same logits either way.

A model runs its layers compiled where every one of them is a `PreNormLayer` with a dense
SiLU-gated MLP and the default rotation, on one shard, with the compiled CPU kernels, and each of
its projections is packed for the compiled matmuls or oneDNN, or quantized. Other models (Gemma's
sandwich norms, mixtures of experts, tensor parallelism) run layer by layer.
"""

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch

from ..layers.attention import (
    AttentionMetadata,
    CompiledCpuAttentionBackend,
    CompiledCpuAttentionMetadata,
    LayerKVCache,
)
from ..layers.linear import Linear
from ..layers.mlp import GatedMLP
from ..layers.ops import CompiledCpuOps
from .decoder import DEFAULT_ROPE, CausalLM, DecoderLayer, PreNormLayer, RopeTables


class CompiledStack:
    """Callable as the layer loop of `CausalLM.forward`: (the last layer's block output, the
    residual stream before it)."""

    def __init__(self, kernels: ModuleType, layers: Sequence[Any]) -> None:
        self.kernels = kernels
        self.stack = kernels.DecoderStack(list(layers))

    def __call__(
        self,
        hidden: torch.Tensor,
        rope_tables: RopeTables,
        kv_cache: Sequence[LayerKVCache],
        metadata: AttentionMetadata,
        prompt_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert isinstance(metadata, CompiledCpuAttentionMetadata)
        cos, sin = rope_tables[DEFAULT_ROPE]
        step = self.kernels.StepInputs(
            cos,
            sin,
            metadata.slot_mapping,
            metadata.block_tables,
            metadata.cache_lens,
            metadata.query_starts,
            prompt_rows,
        )
        return self.stack.forward(
            hidden,
            step,
            [cache.key for cache in kv_cache],
            [cache.value for cache in kv_cache],
            [cache.key_scale for cache in kv_cache],
            [cache.value_scale for cache in kv_cache],
        )


def compile_stack(model: CausalLM) -> CompiledStack | None:
    """The model's layers as a compiled stack, or None where any of them cannot run as one."""
    layers = list(model.layers)
    ops = getattr(layers[0].self_attn, "ops", None) if layers else None
    if not isinstance(ops, CompiledCpuOps) or model.shards.world_size != 1:
        return None
    kernels = ops.kernels
    compiled = [_layer_weights(kernels, layer) for layer in layers]
    if any(layer is None for layer in compiled):
        return None
    return CompiledStack(kernels, compiled)


def _layer_weights(kernels: ModuleType, layer: DecoderLayer) -> Any | None:
    if type(layer) is not PreNormLayer or layer.rope != DEFAULT_ROPE:
        return None
    attention, mlp = layer.self_attn, layer.feed_forward
    if not isinstance(mlp, GatedMLP) or mlp.activation_name not in ("silu", "swish"):
        return None
    if not isinstance(attention.backend, CompiledCpuAttentionBackend):
        return None
    config = attention.config
    if attention.q_size != attention.num_heads * config.head_dim:
        return None
    projections = [
        _projection(kernels, linear)
        for linear in (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj)
    ]
    if any(projection is None for projection in projections):
        return None
    weights = kernels.DecoderLayerWeights()
    weights.qkv, weights.output, weights.gate_up, weights.down = projections
    weights.input_norm = layer.input_layernorm.weight
    weights.post_attention_norm = layer.post_attention_layernorm.weight
    weights.norm_eps = layer.input_layernorm.eps
    if attention.q_norm is not None and attention.k_norm is not None:
        weights.query_norm = attention.q_norm.weight
        weights.key_norm = attention.k_norm.weight
        weights.head_norm_eps = attention.q_norm.eps
    weights.num_heads = attention.num_heads
    weights.num_kv_heads = attention.num_kv_heads
    weights.head_dim = config.head_dim
    weights.scale = config.params.scale
    weights.sliding_window = config.params.sliding_window or 0
    weights.logit_softcap = config.params.logit_softcap or 0.0
    return weights


def _projection(kernels: ModuleType, linear: Linear) -> Any | None:
    """`linear`'s weight as the compiled stack takes it; None where it is not packed for a CPU
    matmul (the layer calls F.linear on it)."""
    projection = kernels.Projection()
    quantized = linear.quantized
    if quantized is not None:
        projection.matmul = kernels.Matmul.QUANTIZED
        projection.weight = quantized.codes
        projection.bias = linear.bias
        projection.out_features = quantized.out_features
        projection.scales = quantized.scales
        projection.offsets = quantized.offsets
        projection.levels = quantized.levels
        projection.input_order = quantized.input_order
        projection.code_format = int(quantized.code_format)
        projection.group_size = quantized.group_size
        projection.tile_order = quantized.tile_order
        return projection
    packed = linear.packed
    if packed is None:
        return None
    # The kernels' Matmul has a value of each LinearMatmul's name.
    projection.matmul = getattr(kernels.Matmul, packed.matmul.name)
    projection.weight = packed.weight
    projection.bias = packed.bias
    projection.out_features = packed.out_features
    return projection
