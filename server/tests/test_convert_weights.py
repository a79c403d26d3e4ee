"""`sluice-server convert-weights`: PyTorch .bin checkpoints into safetensors, tensors only; and
the errors that send a user there (a .bin-only directory) or say Sluice runs no remote code."""

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from sluice_server.convert_weights import ConversionError, convert_weights, safetensors_name
from sluice_server.kernels import Kernels
from sluice_server.models.loader import ModelLoadError, load_model
from sluice_server.weights import CheckpointWeights

# conftest.py's save_tiny_model fixture.
SaveTinyModel = Callable[..., tuple[Path, torch.nn.Module]]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "sluice_server", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def save_as_bin(model_dir: Path, state_dict: dict[str, torch.Tensor], shards: int = 1) -> None:
    """Writes state_dict as transformers did before safetensors: pytorch_model.bin, or shards
    with pytorch_model.bin.index.json."""
    if shards == 1:
        torch.save(state_dict, model_dir / "pytorch_model.bin")
        return
    names = sorted(state_dict)
    weight_map = {}
    for shard in range(shards):
        file = f"pytorch_model-{shard + 1:05d}-of-{shards:05d}.bin"
        part = {name: state_dict[name] for name in names[shard::shards]}
        torch.save(part, model_dir / file)
        weight_map.update(dict.fromkeys(part, file))
    (model_dir / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


def bin_model_dir(
    save_tiny_model: SaveTinyModel, tmp_path: Path, shards: int = 1
) -> tuple[Path, torch.nn.Module]:
    """A tiny Llama with tied embeddings, its weights in PyTorch's format only. The state dict
    holds the embedding twice (as `lm_head.weight` too), sharing one storage."""
    safetensors_dir, model = save_tiny_model("llama", tie_word_embeddings=True)
    model_dir = tmp_path / "bin-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_bytes((safetensors_dir / "config.json").read_bytes())
    state_dict = model.state_dict()
    embedding = state_dict["model.embed_tokens.weight"]
    assert state_dict["lm_head.weight"].data_ptr() == embedding.data_ptr()
    save_as_bin(model_dir, state_dict, shards)
    return model_dir, model


def assert_same_tensors(model_dir: Path, expected: dict[str, torch.Tensor]) -> None:
    with CheckpointWeights(model_dir) as weights:
        for name, tensor in expected.items():
            assert torch.equal(weights.get(name.removeprefix("model.")), tensor), name


def test_names_follow_transformers() -> None:
    assert safetensors_name("pytorch_model.bin") == "model.safetensors"
    assert (
        safetensors_name("pytorch_model-00001-of-00002.bin") == "model-00001-of-00002.safetensors"
    )


def test_a_bin_only_directory_is_refused_with_the_command_that_converts_it(
    save_tiny_model: SaveTinyModel, tmp_path: Path
) -> None:
    model_dir, _ = bin_model_dir(save_tiny_model, tmp_path)
    with pytest.raises(ModelLoadError, match="sluice-server convert-weights") as refused:
        load_model(model_dir, torch.float32, torch.device("cpu"), Kernels.reference())
    assert "has PyTorch .bin weights only" in str(refused.value)


def test_converts_a_single_file_with_tied_tensors_and_serves_it(
    save_tiny_model: SaveTinyModel, tmp_path: Path
) -> None:
    model_dir, model = bin_model_dir(save_tiny_model, tmp_path)
    result = run_cli("convert-weights", str(model_dir))
    assert result.returncode == 0, result.stderr

    assert (model_dir / "model.safetensors").is_file()
    assert not (model_dir / "model.safetensors.index.json").exists()
    assert_same_tensors(model_dir, model.state_dict())

    loaded = load_model(model_dir, torch.float32, torch.device("cpu"), Kernels.reference())
    assert loaded.config.num_layers == 2


def test_converts_shards_and_writes_an_index(
    save_tiny_model: SaveTinyModel, tmp_path: Path
) -> None:
    model_dir, model = bin_model_dir(save_tiny_model, tmp_path, shards=3)
    (model_dir / "tokenizer.json").write_text("{}")
    output_dir = tmp_path / "converted"
    written = convert_weights(model_dir, output_dir)

    shard_names = [f"model-{n:05d}-of-00003.safetensors" for n in (1, 2, 3)]
    assert sorted(path.name for path in written) == sorted(
        [*shard_names, "model.safetensors.index.json", "config.json", "tokenizer.json"]
    )
    index = json.loads((output_dir / "model.safetensors.index.json").read_text())
    state_dict = model.state_dict()
    assert set(index["weight_map"]) == set(state_dict)
    assert set(index["weight_map"].values()) == set(shard_names)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in state_dict.values())
    assert_same_tensors(output_dir, state_dict)
    # The source directory is left as it was.
    assert not list(model_dir.glob("*.safetensors"))


def test_a_pickle_with_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"

    class RunsCode:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    torch.save({"weight": torch.zeros(2), "payload": RunsCode()}, model_dir / "pytorch_model.bin")

    result = run_cli("convert-weights", str(model_dir))
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("sluice-server: error: "), result.stderr
    assert "holds more than tensors, so it was not loaded" in error
    assert not marker.exists()
    assert not list(model_dir.glob("*.safetensors"))


def test_a_directory_without_bin_weights_has_nothing_to_convert(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="has no pytorch_model\\*.bin files"):
        convert_weights(tmp_path)


def test_an_index_naming_missing_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"w": "pytorch_model-00001-of-00002.bin"}})
    )
    with pytest.raises(ConversionError, match="names files that are missing"):
        convert_weights(tmp_path)


def test_unsupported_architecture_with_remote_code_says_sluice_runs_none(tmp_path: Path) -> None:
    config = {"model_type": "my_custom_lm", "auto_map": {"AutoModelForCausalLM": "modeling.MyLM"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as refused:
        load_model(tmp_path, torch.float32, torch.device("cpu"), Kernels.reference())
    message = str(refused.value)
    assert "unsupported model_type 'my_custom_lm'" in message
    assert "it needs remote code, which Sluice does not run" in message
