"""Llama 2 / 3 / 3.1 / 3.2: pre-norm decoder layers of attention and a SwiGLU MLP.

Mistral, Qwen2, Qwen3 and Phi-3 have the same structure and differ only in configuration (a
sliding window, biases, q/k norms, fused checkpoint tensors), so their modules configure
`build_pre_norm_model` too; so do the mixture-of-experts models, with a different feed-forward.
"""

from collections.abc import Callable
from typing import Any

from ..layers.attention import AttentionParams
from ..layers.mlp import GatedMLP
from ..layers.rotary import RopeConfig
from ..layers.runtime import LayerRuntime
from ..layers.self_attention import SelfAttention
from .decoder import DEFAULT_ROPE, CausalLM, FeedForward, ModelConfig, PreNormLayer
from .hf_config import activation, attention_config


def dense_mlp(hf_config: dict[str, Any], runtime: LayerRuntime) -> FeedForward:
    return GatedMLP(
        int(hf_config["hidden_size"]),
        int(hf_config["intermediate_size"]),
        activation(hf_config),
        bool(hf_config.get("mlp_bias", False)),
        runtime,
    )


def build_pre_norm_model(
    hf_config: dict[str, Any],
    runtime: LayerRuntime,
    windows: list[int | None],
    qkv_bias: bool | None = None,
    qk_norm: bool = False,
    feed_forward: Callable[[int], tuple[FeedForward, str]] | None = None,
) -> CausalLM:
    """A stack of `PreNormLayer`s; `feed_forward(layer_index)` gives each layer's feed-forward
    and its checkpoint name (default: the dense MLP, "mlp")."""
    config = ModelConfig.from_hf_config(hf_config)
    scale = config.head_dim**-0.5
    layers = []
    for index, window in enumerate(windows):
        attention = SelfAttention(
            attention_config(
                hf_config,
                config,
                AttentionParams(scale=scale, sliding_window=window),
                qkv_bias=qkv_bias,
                qk_norm=qk_norm,
            ),
            runtime,
        )
        block, name = (
            feed_forward(index) if feed_forward else (dense_mlp(hf_config, runtime), "mlp")
        )
        layers.append(PreNormLayer(attention, block, name, config, runtime))
    ropes = {DEFAULT_ROPE: RopeConfig.from_hf_config(hf_config)}
    return CausalLM(config, layers, ropes, runtime)


def build_llama(hf_config: dict[str, Any], runtime: LayerRuntime) -> CausalLM:
    no_windows = [None] * int(hf_config["num_hidden_layers"])
    return build_pre_norm_model(hf_config, runtime, no_windows)
