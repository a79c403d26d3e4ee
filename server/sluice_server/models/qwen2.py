"""Qwen2 / Qwen2.5: a Llama decoder with biases on the q, k and v projections."""

from typing import Any

from .llama import LlamaConfig, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def config_from_hf(cls, hf_config: dict[str, Any]) -> LlamaConfig:
        sliding_window = (
            hf_config.get("sliding_window") if hf_config.get("use_sliding_window") else None
        )
        return LlamaConfig.from_hf_config(hf_config, qkv_bias=True, sliding_window=sliding_window)
