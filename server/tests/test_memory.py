"""Moving weights into one allocation in huge pages (sluice_server.memory)."""

import sys
from pathlib import Path

import pytest
import torch
from sluice_server import memory
from sluice_server.kernels import Kernels
from sluice_server.layers.linear import Linear
from sluice_server.memory import (
    HUGE_PAGE_BYTES,
    gather_into_huge_pages,
    transparent_huge_pages_mode,
)
from sluice_server.models import loader
from sluice_server.models.loader import load_model, weight_tensors


def vma_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            inside = start <= address < end
        elif inside and fields[0] == "VmFlags:":
            return fields[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_gathered_tensors_keep_identity_and_values_in_one_storage() -> None:
    torch.manual_seed(0)
    tensors = [
        torch.randn(300, 577, dtype=torch.bfloat16),
        torch.randn(33, dtype=torch.float32),
        torch.randint(0, 2**31 - 1, (1000, 3), dtype=torch.int32),
        torch.randint(0, 255, (4099,), dtype=torch.uint8),
    ]
    before = [tensor.clone() for tensor in tensors]
    holders = {"first": tensors[0]}  # a module or dataclass holding the same tensor

    moved = gather_into_huge_pages(tensors + [tensors[1]])  # given twice, moved once

    assert moved == sum(-(-t.numel() * t.element_size() // 64) * 64 for t in tensors)
    assert holders["first"] is tensors[0]
    for tensor, values in zip(tensors, before, strict=True):
        assert torch.equal(tensor, values)
        assert tensor.data_ptr() % 64 == 0
    storages = {tensor.untyped_storage().data_ptr() for tensor in tensors}
    assert len(storages) == 1
    assert tensors[0].data_ptr() % HUGE_PAGE_BYTES == 0  # the first starts on a huge page
    # The tensors lie one after another, in the order given.
    pointers = [tensor.data_ptr() for tensor in tensors]
    assert pointers == sorted(pointers)
    tensors[2][0, 0] = 7  # writable, and apart from its neighbours
    assert torch.equal(tensors[3], before[3]) and torch.equal(tensors[1], before[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux's")
def test_the_allocation_is_advised_for_huge_pages() -> None:
    tensor = torch.randn(3 * HUGE_PAGE_BYTES // 4)
    gather_into_huge_pages([tensor])
    # "hg": MADV_HUGEPAGE. Whether Linux then finds 2 MiB pages is its own business (free memory,
    # the transparent_hugepage setting); the advice is ours.
    assert "hg" in vma_flags(tensor.data_ptr())


def test_views_and_other_devices_stay_where_they_are() -> None:
    whole = torch.arange(100, dtype=torch.float32)
    view = whole[10:20]
    transposed = torch.randn(8, 4).t()
    empty = torch.empty(0)
    pointers = [t.data_ptr() for t in (view, transposed, whole)]

    moved = gather_into_huge_pages([view, transposed, empty])

    assert moved == 0
    assert [t.data_ptr() for t in (view, transposed, whole)] == pointers


def test_a_loaded_model_holds_its_weights_in_one_allocation(
    tiny_llama: tuple[Path, torch.nn.Module],
) -> None:
    loaded = load_model(tiny_llama[0], torch.float32, torch.device("cpu"), Kernels.reference())
    # oneDNN's packed weights (float32 here) are opaque tensors that stay in their own memory.
    weights = [
        t for t in weight_tensors(loaded.model) if t.numel() > 0 and t.layout == torch.strided
    ]
    assert len(weights) > 1
    assert len({t.untyped_storage().data_ptr() for t in weights}) == 1


def test_packed_projections_share_the_allocation(
    tiny_llama: tuple[Path, torch.nn.Module], compiled_kernels: Kernels
) -> None:
    loaded = load_model(tiny_llama[0], torch.bfloat16, torch.device("cpu"), compiled_kernels)
    packed = [
        module.packed.weight
        for module in loaded.model.modules()
        if isinstance(module, Linear) and module.packed is not None
    ]
    if not packed or any(weight.layout != torch.strided for weight in packed):
        pytest.skip("this CPU's kernels leave bfloat16 projections to oneDNN's opaque layout")
    storages = {weight.untyped_storage().data_ptr() for weight in packed}
    storages.add(loaded.model.embed_tokens.weight.untyped_storage().data_ptr())
    assert len(storages) == 1


@pytest.mark.parametrize(
    ("text", "mode"),
    [
        ("always [madvise] never\n", "madvise"),
        ("[always] madvise never\n", "always"),
        ("always madvise [never]\n", "never"),
        ("garbled\n", None),
    ],
)
def test_transparent_huge_pages_mode(tmp_path: Path, text: str, mode: str | None) -> None:
    setting = tmp_path / "enabled"
    setting.write_text(text)
    assert transparent_huge_pages_mode(setting) == mode
    assert transparent_huge_pages_mode(tmp_path / "missing") is None


def test_loading_warns_where_huge_pages_are_off(
    tiny_llama: tuple[Path, torch.nn.Module],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(loader, "transparent_huge_pages_mode", lambda: "never")
    with caplog.at_level("WARNING", logger=loader.logger.name):
        load_model(tiny_llama[0], torch.float32, torch.device("cpu"), Kernels.reference())
    assert "transparent huge pages are off" in caplog.text
    assert "6-9 % slower" in caplog.text


def test_the_freed_heap_is_handed_back_as_the_weights_move(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(memory, "TRIM_EVERY_BYTES", 8192)
    monkeypatch.setattr(memory, "release_freed_heap", lambda: calls.append(1))
    memory.gather_into_huge_pages([torch.zeros(1024) for _ in range(6)])  # 4 KiB each
    assert len(calls) == 3 + 1  # after every second tensor, and once at the end
