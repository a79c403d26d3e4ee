"""Which implementation serves which `model_type` of a Hugging Face config.json."""

from collections.abc import Mapping
from types import MappingProxyType

from .llama import LlamaForCausalLM
from .mistral import MistralForCausalLM
from .qwen2 import Qwen2ForCausalLM

MODEL_CLASSES: Mapping[str, type[LlamaForCausalLM]] = MappingProxyType(
    {
        "llama": LlamaForCausalLM,
        "mistral": MistralForCausalLM,
        "qwen2": Qwen2ForCausalLM,
    }
)


class UnsupportedModelError(ValueError):
    pass


def model_class_for(model_type: str) -> type[LlamaForCausalLM]:
    try:
        return MODEL_CLASSES[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(MODEL_CLASSES))}"
        ) from None
