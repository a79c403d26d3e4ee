"""Mistral (and Mistral-Nemo, whose head_dim is not hidden_size / heads): Llama's structure with
an optional sliding attention window on every layer."""

from typing import Any

from ..layers.runtime import LayerRuntime
from .decoder import CausalLM
from .hf_config import sliding_windows
from .llama import build_pre_norm_model


def build_mistral(hf_config: dict[str, Any], runtime: LayerRuntime) -> CausalLM:
    return build_pre_norm_model(hf_config, runtime, sliding_windows(hf_config, lambda _: True))
