"""Token limits left unset: TGI 3's defaults, the model's context length capped by what the KV
cache holds, settled by the router after warmup."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from conftest import SluiceServer, serve
from text_generation import Client
from text_generation.errors import ValidationError

# float32 K/V of the default model take 46,080 bytes per token: 96 MB hold 2,083 tokens, 130
# whole blocks of 16, far below the model's 8,192 positions.
CACHE_TOKENS = 2080
CONTEXT_LENGTH = 8192


@pytest.fixture(scope="module")
def server() -> Iterator[SluiceServer]:
    yield from serve("--kv-cache-memory", "96MB")


def prompt_of(server: SluiceServer, approximate_tokens: int) -> tuple[str, int]:
    """A plain-text prompt of about that many tokens, and its exact length."""
    text = " ".join(f"Line {i}: the river carries sand to the sea." for i in range(10_000))
    words = text.split(" ")
    prompt = " ".join(words[: approximate_tokens * 2 // 3])
    tokens = requests.post(f"{server.url}/tokenize", json={"inputs": prompt}, timeout=60)
    tokens.raise_for_status()
    return prompt, len(tokens.json())


def test_unset_limits_are_the_cache_when_it_holds_less_than_the_context(
    server: SluiceServer,
) -> None:
    info = requests.get(f"{server.url}/info", timeout=30).json()
    assert info["max_batch_total_tokens"] == CACHE_TOKENS < CONTEXT_LENGTH
    assert info["max_total_tokens"] == CACHE_TOKENS
    assert info["max_input_tokens"] == CACHE_TOKENS - 1


def test_a_prompt_past_the_old_1024_token_default_is_served(server: SluiceServer) -> None:
    prompt, length = prompt_of(server, 1358)
    assert 1100 < length < CACHE_TOKENS - 8, length
    response = Client(server.url, timeout=300).generate(prompt, max_new_tokens=4)
    assert response.details.generated_tokens == 4


def test_a_prompt_past_the_settled_limit_gets_422_naming_it(server: SluiceServer) -> None:
    prompt, length = prompt_of(server, CACHE_TOKENS + 50)
    assert length > CACHE_TOKENS - 1, length
    with pytest.raises(ValidationError, match=str(CACHE_TOKENS - 1)):
        Client(server.url, timeout=60).generate(prompt, max_new_tokens=1)
