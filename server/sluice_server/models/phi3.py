"""Phi-3: Llama's structure with q/k/v and gate/up stored fused in the checkpoint (the layers
load either form), LongRoPE scaling for the 128k-context variants, and a sliding window on every
layer where the config sets one."""

from typing import Any

from ..layers.runtime import LayerRuntime
from .decoder import CausalLM
from .hf_config import sliding_windows
from .llama import build_pre_norm_model


def build_phi3(hf_config: dict[str, Any], runtime: LayerRuntime) -> CausalLM:
    return build_pre_norm_model(hf_config, runtime, sliding_windows(hf_config, lambda _: True))
