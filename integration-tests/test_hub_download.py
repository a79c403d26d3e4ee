"""Models from the Hugging Face Hub through the real launcher, against a stand-in for the Hub
(fake_hub.py): `--model-id org/name` downloads what serving needs into the Hugging Face cache
and serves it; a gated repository fails with one clear line; offline mode downloads nothing.

The served model is a tiny random Llama with the default model's tokenizer, so its answers are
checked against the same model's greedy tokens computed here with transformers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch
from conftest import SluiceServer, free_port, serve
from fake_hub import FakeHub

MODEL_ID = "test-org/tiny-llama"
GATED_MODEL_ID = "test-org/gated-llama"
# What the launcher fetches of the repository: the rest is not for serving.
SERVING_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}
NOT_FOR_SERVING = {
    "README.md": b"# tiny-llama\n",
    "pytorch_model.bin": b"the same weights, pickled",
    "original/consolidated.safetensors": b"the same weights again",
}
PROMPT = "The capital of France is"
NEW_TOKENS = 8
# The Hub's and transformers' variables, which would change what the launcher does.
HUB_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@pytest.fixture(scope="module")
def tiny_model(
    tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path
) -> tuple[Path, torch.nn.Module]:
    """A random tiny Llama saved as safetensors, with the default model's tokenizer files."""
    import transformers

    tokenizer_dir = default_model_dir
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=49152,
        max_position_embeddings=1024,
        # Spread-out logits, so that greedy choices are not near-ties.
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model_dir = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, model_dir / name)
    return model_dir, model


@pytest.fixture(scope="module")
def hub(tiny_model: tuple[Path, torch.nn.Module]) -> Iterator[FakeHub]:
    model_dir, _ = tiny_model
    with FakeHub() as hub:
        repo = hub.add_repo_from_dir(MODEL_ID, model_dir)
        repo.files.update(NOT_FOR_SERVING)
        hub.add_repo_from_dir(GATED_MODEL_ID, model_dir, gated_token="hf_not_given")
        yield hub


def hub_environment(hub: FakeHub, **extra: str) -> dict[str, str]:
    """The launcher's environment: the fake Hub, an empty cache, no token."""
    home = Path(tempfile.mkdtemp(prefix="sluice-hf-"))
    env = {name: value for name, value in os.environ.items() if name not in HUB_VARIABLES}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(home),
        HF_HUB_CACHE=str(home / "hub"),
        **extra,
    )
    return env


@pytest.fixture(scope="module")
def server(hub: FakeHub) -> Iterator[SluiceServer]:
    env = hub_environment(hub)
    yield from serve(
        "--max-input-tokens", "256", "--max-total-tokens", "512", model_id=MODEL_ID, env=env
    )


def run_launcher(model_id: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    launcher = shutil.which("sluice-launcher")
    assert launcher is not None, "sluice-launcher is not on PATH: run `make install` first"
    workdir = Path(tempfile.mkdtemp(prefix="sluice-it-"))
    # fmt: off
    command = [
        launcher,
        "--model-id", model_id,
        "--hostname", "127.0.0.1",
        "--port", str(free_port()),
        "--shard-uds-path", str(workdir / "shard"),
    ]
    # fmt: on
    return subprocess.run(
        command, capture_output=True, text=True, timeout=300, env=env, start_new_session=True
    )


def greedy_tokens(model: torch.nn.Module, prompt_ids: list[int], count: int) -> list[int]:
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(count):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt_ids) :]


def test_serves_the_model_it_downloaded(
    server: SluiceServer, tiny_model: tuple[Path, torch.nn.Module]
) -> None:
    _, model = tiny_model
    tokens = requests.post(f"{server.url}/tokenize", json={"inputs": PROMPT}, timeout=60)
    assert tokens.status_code == 200, tokens.text
    prompt_ids = [token["id"] for token in tokens.json()]

    response = requests.post(
        f"{server.url}/generate",
        json={
            "inputs": PROMPT,
            "parameters": {"max_new_tokens": NEW_TOKENS, "details": True, "ignore_eos": True},
        },
        timeout=120,
    )
    assert response.status_code == 200, response.text
    generated = [token["id"] for token in response.json()["details"]["tokens"]]
    assert generated == greedy_tokens(model, prompt_ids, NEW_TOKENS)


def test_only_the_serving_files_were_downloaded(server: SluiceServer, hub: FakeHub) -> None:
    assert hub.downloaded_files(MODEL_ID) == SERVING_FILES
    log = server.log_path.read_text(errors="replace")
    snapshot_line = next(line for line in log.splitlines() if f"serving {MODEL_ID} from" in line)
    snapshot = Path(snapshot_line.split(" from ", 1)[1].strip())
    assert snapshot.parent.parent.name == "models--test-org--tiny-llama", snapshot
    assert {path.name for path in snapshot.iterdir()} == SERVING_FILES


def test_the_download_progress_is_in_the_launcher_log(server: SluiceServer) -> None:
    log = server.log_path.read_text(errors="replace")
    finished = f"Fetching {len(SERVING_FILES)} files: 100% ({len(SERVING_FILES)} of"
    progress = [line for line in log.splitlines() if "download-weights" in line]
    assert any(finished in line for line in progress), log


def test_a_gated_model_without_a_token_fails_with_one_clear_line(hub: FakeHub) -> None:
    result = run_launcher(GATED_MODEL_ID, hub_environment(hub))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert (
        f"cannot download `{GATED_MODEL_ID}` from the Hugging Face Hub: {GATED_MODEL_ID} is "
        "gated: accept its terms on the Hub and set HF_TOKEN"
    ) in output, output
    assert hub.downloaded_files(GATED_MODEL_ID) == set()


def test_offline_with_nothing_cached_downloads_nothing(hub: FakeHub) -> None:
    requests_before = len(hub.requests)
    result = run_launcher(MODEL_ID, hub_environment(hub, HF_HUB_OFFLINE="1"))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f"model `{MODEL_ID}` not found" in output, output
    assert "HF_HUB_OFFLINE is set, so it was not downloaded from the Hub" in output, output
    assert len(hub.requests) == requests_before
