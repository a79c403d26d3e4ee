"""Readers for the config.json fields that several architectures share."""

from collections.abc import Callable
from typing import Any

from ..layers.attention import AttentionParams
from ..layers.mlp import check_activation
from ..layers.self_attention import SelfAttentionConfig
from .decoder import ModelConfig


def sliding_windows(
    hf_config: dict[str, Any], windowed_by_default: Callable[[int], bool]
) -> list[int | None]:
    """Each layer's attention window (None: the whole context).

    `layer_types` (transformers v5 writes it) names each layer's kind; older configs leave it to
    the architecture's rule, `windowed_by_default(layer_index)`.
    """
    num_layers = int(hf_config["num_hidden_layers"])
    window = hf_config.get("sliding_window")
    if not window or hf_config.get("use_sliding_window") is False:
        return [None] * num_layers
    layer_types = hf_config.get("layer_types")
    if layer_types:
        if len(layer_types) != num_layers:
            raise ValueError(f"layer_types names {len(layer_types)} layers, the model has {num_layers}")
        return [int(window) if kind == "sliding_attention" else None for kind in layer_types]
    return [int(window) if windowed_by_default(index) else None for index in range(num_layers)]


def activation(hf_config: dict[str, Any]) -> str:
    name = hf_config.get("hidden_activation") or hf_config.get("hidden_act") or "silu"
    return check_activation(str(name))


def attention_config(
    hf_config: dict[str, Any],
    config: ModelConfig,
    params: AttentionParams,
    qkv_bias: bool | None = None,
    qk_norm: bool = False,
    norm_weight_offset: float = 0.0,
) -> SelfAttentionConfig:
    """Llama-shaped attention: `attention_bias` puts a bias on all four projections unless the
    architecture says otherwise for q/k/v (Qwen2 always has one there)."""
    attention_bias = bool(hf_config.get("attention_bias", False))
    return SelfAttentionConfig(
        hidden_size=config.hidden_size,
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        params=params,
        qkv_bias=attention_bias if qkv_bias is None else qkv_bias,
        o_bias=attention_bias,
        qk_norm_eps=config.rms_norm_eps if qk_norm else None,
        norm_weight_offset=norm_weight_offset,
    )
