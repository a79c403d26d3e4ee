"""Gemma 2 and Gemma 3 (text): sandwich-normed decoder layers with a GeGLU MLP, embeddings scaled
by sqrt(hidden_size), norms that store w - 1, attention scaled by `query_pre_attn_scalar`, and
local (sliding-window) layers alternating with global ones.

Gemma 2 soft-caps attention scores and the final logits; Gemma 3 instead RMS-normalises each
query and key head, and rotates its local layers with their own base frequency
(`rope_local_base_freq`, without the global layers' scaling).
"""

from dataclasses import replace
from typing import Any

from ..layers.attention import AttentionParams
from ..layers.mlp import GatedMLP
from ..layers.rotary import RopeConfig
from ..layers.runtime import LayerRuntime
from ..layers.self_attention import SelfAttention
from .decoder import DEFAULT_ROPE, CausalLM, ModelConfig, SandwichNormLayer
from .hf_config import activation, attention_config, sliding_windows

# Gemma's norms compute x / rms(x) * (1 + w).
NORM_WEIGHT_OFFSET = 1.0
LOCAL_ROPE = "local"


def build_gemma2(hf_config: dict[str, Any], runtime: LayerRuntime) -> CausalLM:
    windows = sliding_windows(hf_config, lambda index: index % 2 == 0)
    ropes = {DEFAULT_ROPE: RopeConfig.from_hf_config(hf_config)}
    return _build_gemma(hf_config, runtime, windows, ropes, qk_norm=False)


def build_gemma3(hf_config: dict[str, Any], runtime: LayerRuntime) -> CausalLM:
    pattern = int(hf_config.get("sliding_window_pattern", 6))
    windows = sliding_windows(hf_config, lambda index: (index + 1) % pattern != 0)
    return _build_gemma(hf_config, runtime, windows, _gemma3_ropes(hf_config), qk_norm=True)


def _gemma3_ropes(hf_config: dict[str, Any]) -> dict[str, RopeConfig]:
    """Global layers rotate by `rope_parameters["full_attention"]` (or the legacy `rope_theta`
    and `rope_scaling`), local ones by `rope_parameters["sliding_attention"]` (or
    `rope_local_base_freq`)."""
    per_type = hf_config.get("rope_parameters") or {}
    if "full_attention" in per_type:
        return {
            DEFAULT_ROPE: RopeConfig.from_hf_config(hf_config, per_type["full_attention"]),
            LOCAL_ROPE: RopeConfig.from_hf_config(hf_config, per_type["sliding_attention"]),
        }
    local_theta = float(hf_config.get("rope_local_base_freq", 10000.0))
    return {
        DEFAULT_ROPE: RopeConfig.from_hf_config(hf_config),
        LOCAL_ROPE: RopeConfig.from_hf_config(hf_config, {"rope_theta": local_theta}),
    }


def _build_gemma(
    hf_config: dict[str, Any],
    runtime: LayerRuntime,
    windows: list[int | None],
    ropes: dict[str, RopeConfig],
    qk_norm: bool,
) -> CausalLM:
    # Gemma ties its LM head to the embeddings unless the config says otherwise.
    config = replace(
        ModelConfig.from_hf_config(hf_config),
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", True)),
    )
    scale = float(hf_config.get("query_pre_attn_scalar", config.head_dim)) ** -0.5
    softcap = hf_config.get("attn_logit_softcapping")
    layers = []
    for window in windows:
        params = AttentionParams(
            scale=scale,
            sliding_window=window,
            logit_softcap=None if softcap is None else float(softcap),
        )
        attention = SelfAttention(
            attention_config(
                hf_config,
                config,
                params,
                qk_norm=qk_norm,
                norm_weight_offset=NORM_WEIGHT_OFFSET,
            ),
            runtime,
        )
        mlp = GatedMLP(
            config.hidden_size,
            int(hf_config["intermediate_size"]),
            activation(hf_config),
            False,
            runtime,
        )
        rope = LOCAL_ROPE if window is not None and LOCAL_ROPE in ropes else DEFAULT_ROPE
        layers.append(
            SandwichNormLayer(attention, mlp, config, runtime, rope, NORM_WEIGHT_OFFSET)
        )
    final_softcap = hf_config.get("final_logit_softcapping")
    return CausalLM(
        config,
        layers,
        ropes,
        runtime,
        embedding_scale=config.hidden_size**0.5,
        final_logit_softcap=None if final_softcap is None else float(final_softcap),
        norm_weight_offset=NORM_WEIGHT_OFFSET,
    )

