"""Every supported architecture served end to end by the real launcher, router and shard: a tiny
random model of each family (made here with transformers, with the default model's tokenizer)
answers a greedy request with exactly the tokens transformers' own `generate` picks.

Layer-by-layer logits are compared in server/tests/test_models_vs_transformers.py; this checks
that the whole path (config reading, weight loading, tokenization, scheduling, sampling) works
for each family.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from conftest import SluiceServer, serve

PROMPT = "The quick brown fox jumps over the lazy dog because"
NEW_TOKENS = 12
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

COMMON = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "initializer_range": 0.2,
    "tie_word_embeddings": False,
}
MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}

# family -> (transformers config class, causal-LM class, config overrides). Windows shorter than
# the prompt, so that the windowed path serves.
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 6}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0, "sliding_window": 7}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 6}),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {"head_dim": 16, "sliding_window": 6, "sliding_window_pattern": 2},
    ),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, **MOE}),
    "qwen2-moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {"num_experts": 4, "shared_expert_intermediate_size": 48, **MOE},
    ),
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"num_experts": 4, **MOE}),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(
    request: pytest.FixtureRequest, default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, torch.nn.Module, SluiceServer]]:
    import transformers

    family = request.param
    config_name, model_name, overrides = FAMILIES[family]
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    config = getattr(transformers, config_name)(
        **COMMON,
        **overrides,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    directory = tmp_path_factory.mktemp(family)
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        if (default_model_dir / name).is_file():
            shutil.copy(default_model_dir / name, directory / name)
    for running in serve(model_id=str(directory)):
        yield family, model, running


def test_greedy_answer_equals_transformers(family_model, default_model_dir: Path) -> None:
    import transformers

    family, model, running = family_model
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    prompt_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(
            prompt_ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None
        )[0, prompt_ids.shape[1] :].tolist()

    response = requests.post(
        f"{running.url}/generate",
        json={
            "inputs": PROMPT,
            "parameters": {"max_new_tokens": NEW_TOKENS, "details": True, "ignore_eos": True},
        },
        timeout=120,
    )
    assert response.status_code == 200, response.text
    tokens = response.json()["details"]["tokens"]
    assert [token["id"] for token in tokens] == expected, family
