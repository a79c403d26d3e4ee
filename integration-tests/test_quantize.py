"""`--quantize gguf`: the default model's GGUF file served as stored (Q4_1 projections, a Q8_0
LM head) through the quantized CPU kernel, end to end with the real launcher, router and shard,
and TGI's client."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import SluiceServer, free_port, serve
from helpers import generate
from text_generation import Client


@pytest.fixture(scope="module")
def server() -> Iterator[SluiceServer]:
    yield from serve("--quantize", "gguf", "--max-input-tokens", "256", "--max-total-tokens", "512")


def test_the_shard_holds_the_quantized_weights(server: SluiceServer) -> None:
    log = server.log_path.read_text(errors="replace")
    assert "quantized as stored" in log
    # float32 holds 513 MiB of weights; Q4_1 and Q8_0 blocks about 100 MiB of it, the rest
    # being the float32 embedding the lookup reads.
    held = re.search(r"holds ([0-9.]+) MiB of weights", log)
    assert held is not None, log
    assert float(held.group(1)) < 256


def test_greedy_answer_knows_the_capital_of_france(server: SluiceServer, chat_prompt) -> None:
    client = Client(server.url, timeout=120)
    response = client.generate(chat_prompt("What is the capital of France?"), max_new_tokens=20)
    assert "Paris" in response.generated_text


def test_batched_requests_match_each_alone(server: SluiceServer, chat_prompt) -> None:
    """The quantized matmul computes each row alone, so a request's greedy output does not
    depend on the 15 others it is batched with."""
    topics = ["rivers", "owls", "glass", "tea", "volcanoes", "honey", "trains", "music",
              "bees", "clouds", "maps", "salt", "wolves", "paper", "ice", "copper"]  # fmt: skip
    prompts = [chat_prompt(f"Tell me a fact about {topic}.") for topic in topics]
    solo = [generate(server, p, max_new_tokens=24)["generated_text"] for p in prompts]
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        together = list(
            pool.map(lambda p: generate(server, p, max_new_tokens=24)["generated_text"], prompts)
        )
    assert together == solo
    assert len(set(solo)) == len(prompts)


@pytest.mark.parametrize(
    ("quantize", "model", "message"),
    [
        ("gguf", "directory", "is not a .gguf file"),
        ("awq", "default", "--quantize awq: Sluice does not have this feature yet"),
    ],
)
def test_quantization_the_model_cannot_take_is_refused_at_startup(
    default_model_dir: Path, quantize: str, model: str, message: str, tmp_path: Path
) -> None:
    launcher = shutil.which("sluice-launcher")
    assert launcher is not None
    model_id = (
        str(default_model_dir) if model == "directory" else "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    result = subprocess.run(
        [
            launcher,
            "--model-id",
            model_id,
            "--quantize",
            quantize,
            "--port",
            str(free_port()),
            "--shard-uds-path",
            str(tmp_path / "shard"),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
