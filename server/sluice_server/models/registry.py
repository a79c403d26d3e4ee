"""Which builder serves which `model_type` of a Hugging Face config.json."""

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from ..layers.runtime import LayerRuntime
from .decoder import CausalLM
from .gemma import build_gemma2, build_gemma3
from .llama import build_llama
from .mistral import build_mistral
from .mixtral import build_mixtral
from .phi3 import build_phi3
from .qwen2 import build_qwen2, build_qwen3
from .qwen_moe import build_qwen2_moe, build_qwen3_moe

ModelBuilder = Callable[[dict[str, Any], LayerRuntime], CausalLM]

MODEL_BUILDERS: Mapping[str, ModelBuilder] = MappingProxyType(
    {
        "llama": build_llama,
        "mistral": build_mistral,
        "qwen2": build_qwen2,
        "qwen3": build_qwen3,
        "phi3": build_phi3,
        "gemma2": build_gemma2,
        "gemma3_text": build_gemma3,
        "mixtral": build_mixtral,
        "qwen2_moe": build_qwen2_moe,
        "qwen3_moe": build_qwen3_moe,
    }
)


class UnsupportedModelError(ValueError):
    pass


def model_builder_for(model_type: str) -> ModelBuilder:
    try:
        return MODEL_BUILDERS[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(MODEL_BUILDERS))}"
        ) from None
