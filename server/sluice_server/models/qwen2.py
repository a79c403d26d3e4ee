"""Qwen2 / Qwen2.5 and Qwen3: Llama's structure. Qwen2 has biases on the q, k and v projections;
Qwen3 has none but RMS-normalises each query and key head before the rotation. Both may window
the layers from `max_window_layers` on."""

from typing import Any

from ..layers.runtime import LayerRuntime
from .decoder import CausalLM
from .hf_config import sliding_windows
from .llama import build_pre_norm_model


def qwen_windows(hf_config: dict[str, Any]) -> list[int | None]:
    first_windowed = int(hf_config.get("max_window_layers", 0))
    return sliding_windows(hf_config, lambda index: index >= first_windowed)


def build_qwen2(hf_config: dict[str, Any], runtime: LayerRuntime) -> CausalLM:
    return build_pre_norm_model(hf_config, runtime, qwen_windows(hf_config), qkv_bias=True)


def build_qwen3(hf_config: dict[str, Any], runtime: LayerRuntime) -> CausalLM:
    return build_pre_norm_model(hf_config, runtime, qwen_windows(hf_config), qk_norm=True)
