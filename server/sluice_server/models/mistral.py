"""Mistral: a Llama decoder whose configs may declare a sliding attention window."""

from typing import Any

from .llama import LlamaConfig, LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    @classmethod
    def config_from_hf(cls, hf_config: dict[str, Any]) -> LlamaConfig:
        return LlamaConfig.from_hf_config(hf_config, sliding_window=hf_config.get("sliding_window"))
