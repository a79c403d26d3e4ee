"""Quantized serving end to end with the real launcher, router and shard, and TGI's client, all
through the quantized CPU kernel:

- the default model's GGUF file served as stored (`--quantize gguf`: Q4_1 projections, a Q8_0
  LM head);
- the default model written as checkpoints in AWQ's (4 bits per group of 32), GPTQ's (8 bits per
  group of 64, act-order) and compressed-tensors' FP8 (scales per block of 32 x 32) formats;
- the default model quantized at load: `--quantize fp8`, `bitsandbytes`, `bitsandbytes-nf4`,
  `bitsandbytes-fp4`.

(GPTQ's 4-bit codes take AWQ's path through the kernel; rounded to the nearest in random
act-order groups, as here, they leave the small model too few good answers to compare.)"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import SluiceServer, free_port, serve
from helpers import generate
from text_generation import Client

SERVER_TESTS = Path(__file__).parents[1] / "server" / "tests"
# Write AWQ and GPTQ checkpoints by round-to-nearest quantization, and FP8 ones with
# compressed-tensors (see their docstrings).
PACKED_CHECKPOINTS = SERVER_TESTS / "packed_checkpoints.py"
FP8_CHECKPOINTS = SERVER_TESTS / "fp8_checkpoints.py"
AT_LOAD = ["fp8", "bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4"]


@pytest.fixture(scope="module")
def packed_checkpoint(
    default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> callable:
    """The default model quantized with a method, written once per module."""
    written: dict[str, Path] = {}

    def write(method: str) -> Path:
        if method not in written:
            out = tmp_path_factory.mktemp(method)
            if method == "fp8":
                command = [sys.executable, FP8_CHECKPOINTS, default_model_dir, out, "block"]
            else:
                gptq = ["--bits", "8", "--group-size", "64", "--act-order"]
                flags = gptq if method == "gptq" else []
                command = [
                    sys.executable,
                    PACKED_CHECKPOINTS,
                    method,
                    default_model_dir,
                    out,
                    *flags,
                ]
            subprocess.run(command, check=True)
            written[method] = out
        return written[method]

    return write


@pytest.fixture(scope="module", params=["gguf", "awq", "gptq", "fp8-checkpoint", *AT_LOAD])
def server(request: pytest.FixtureRequest, packed_checkpoint: callable) -> Iterator[SluiceServer]:
    limits = ("--max-input-tokens", "256", "--max-total-tokens", "512")
    if request.param in ("gguf", *AT_LOAD):
        yield from serve("--quantize", request.param, *limits)
    elif request.param == "gptq":
        yield from serve("--quantize", "gptq", *limits, model_id=str(packed_checkpoint("gptq")))
    else:
        # Served quantized because its config.json says so.
        method = request.param.removesuffix("-checkpoint")
        yield from serve(*limits, model_id=str(packed_checkpoint(method)))


def test_the_shard_holds_the_quantized_weights(server: SluiceServer) -> None:
    log = server.log_path.read_text(errors="replace")
    assert "as stored" in log or "as they load" in log
    # float32 holds 513 MiB of weights; 4-bit projections (and GGUF's Q8_0 LM head) about
    # 100 MiB of it and 8-bit ones about 200, the rest being the float32 embedding the lookup
    # reads.
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
        ("eetq", "default", "--quantize eetq: Sluice does not have this feature yet"),
        ("awq", "directory", "is not quantized"),
        ("gptq", "awq", "--quantize gptq conflicts with the checkpoint"),
        ("bitsandbytes-nf4", "fp8", "--quantize bitsandbytes-nf4 conflicts with the checkpoint"),
    ],
)
def test_quantization_the_model_cannot_take_is_refused_at_startup(
    default_model_dir: Path,
    packed_checkpoint: callable,
    quantize: str,
    model: str,
    message: str,
    tmp_path: Path,
) -> None:
    launcher = shutil.which("sluice-launcher")
    assert launcher is not None
    model_id = {
        "directory": str(default_model_dir),
        "default": "HuggingFaceTB/SmolLM2-135M-Instruct",
    }.get(model) or str(packed_checkpoint(model))
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
