"""Loading refusals that need no checkpoint to be read."""

from pathlib import Path

import pytest
import torch
from sluice_server.kernels import Kernels
from sluice_server.models import loader
from sluice_server.models.loader import ModelLoadError, load_model


def test_weights_larger_than_the_available_memory_fail_before_loading(
    tiny_llama: tuple[Path, torch.nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A host with 1 KiB available stands in for a model too large for its machine.
    monkeypatch.setattr(loader, "available_memory", lambda device: 1024)
    with pytest.raises(ModelLoadError) as refused:
        load_model(tiny_llama[0], torch.float32, torch.device("cpu"), Kernels.reference())
    message = str(refused.value)
    assert "in torch.float32 on this rank, but only 0.00 GiB of memory is available" in message
    assert "use a smaller --dtype, more shards (--num-shard)" in message


def test_weights_that_fit_load(tiny_llama: tuple[Path, torch.nn.Module]) -> None:
    loaded = load_model(tiny_llama[0], torch.float32, torch.device("cpu"), Kernels.reference())
    assert 0 < loaded.weight_bytes < loader.available_memory(torch.device("cpu"))
