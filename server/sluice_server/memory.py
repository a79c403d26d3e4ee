"""Host and device memory: how much a device has left for the weights and the KV cache, and
2 MiB pages for the tensors a step reads all of."""

import ctypes
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

HUGE_PAGE_BYTES = 2 * 2**20
MADV_HUGEPAGE = 14
TRANSPARENT_HUGE_PAGES = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# Where each gathered tensor starts in the shared allocation: a cache line, as the kernels'
# vector loads of packed weights expect.
GATHER_ALIGNMENT = 64
# How many bytes gather_into_huge_pages moves between handing the freed heap back.
TRIM_EVERY_BYTES = 2**30


def available_host_memory() -> int:
    """MemAvailable from /proc/meminfo: free memory plus what the kernel can reclaim."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def available_memory(device: torch.device) -> int:
    """Bytes free on `device`: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    return available_host_memory()


def advise_huge_pages(tensor: torch.Tensor) -> None:
    """Asks Linux to back the whole 2 MiB pages within the tensor's memory with huge pages
    (transparent huge pages), which its pages get when first touched after this.

    With 4 KiB pages, memory read once per step from end to end costs a TLB miss every 4 KiB: a
    KV cache of gigabytes, whose blocks a decode step reads wherever they lie (measured on the
    default model, batch-32 decode steps over scattered blocks: 34.9 to 36.1 ms with 4 KiB pages,
    33.1 to 33.5 ms with huge pages, 28 to 30 ms over contiguous blocks), and the projections'
    weights (gather_into_huge_pages). Best effort: where transparent huge pages are off,
    nothing changes.
    """
    libc = _linux_libc()
    if libc is None:
        return
    start = tensor.data_ptr()
    end = start + tensor.nbytes
    aligned_start = -(-start // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    aligned_end = end // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if aligned_end > aligned_start:
        libc.madvise(
            ctypes.c_void_p(aligned_start),
            ctypes.c_size_t(aligned_end - aligned_start),
            ctypes.c_int(MADV_HUGEPAGE),
        )


def transparent_huge_pages_mode(setting: Path = TRANSPARENT_HUGE_PAGES) -> str | None:
    """Linux's transparent huge pages setting: "always", "madvise" (pages advised for them get
    them, the usual default) or "never"; None where the setting cannot be read."""
    try:
        text = setting.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def gather_into_huge_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Moves the CPU tensors into one allocation in huge pages (see advise_huge_pages); returns
    the bytes moved.

    Each tensor keeps its identity and its values and only its memory changes (`Tensor.set_`), so
    every module, dataclass and compiled kernel that holds it reads it from the new place. A
    weight allocated alone is mostly too small for a 2 MiB page of its own (a 576-wide model's
    projections are 0.7 to 3.5 MB), so without this the weights a decode step streams sit in
    4 KiB pages. Only a tensor that is the whole of its storage moves (a view of a larger tensor
    would leave the rest behind); a tensor given twice moves once.
    """
    movable: dict[int, torch.Tensor] = {}
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.layout != torch.strided:
            continue  # oneDNN's packed weights are opaque tensors with no storage to move
        storage = tensor.untyped_storage()
        if (
            tensor.numel() > 0
            and tensor.is_contiguous()
            and tensor.storage_offset() == 0
            and storage.nbytes() == tensor.nbytes
        ):
            movable.setdefault(storage.data_ptr(), tensor)
    if not movable:
        return 0
    offsets, total = [], 0
    for tensor in movable.values():
        offsets.append(total)
        total += -(-tensor.nbytes // GATHER_ALIGNMENT) * GATHER_ALIGNMENT
    # Room to start on a 2 MiB boundary, so that the first tensor's pages are huge ones too.
    arena = torch.empty(total + HUGE_PAGE_BYTES, dtype=torch.uint8)
    start = -arena.data_ptr() % HUGE_PAGE_BYTES
    advise_huge_pages(arena)
    storage = arena.untyped_storage()
    untrimmed = 0
    with torch.no_grad():
        for tensor, offset in zip(movable.values(), offsets, strict=True):
            place = arena[start + offset : start + offset + tensor.nbytes]
            place.copy_(tensor.view(-1).view(torch.uint8))
            element_offset = (start + offset) // tensor.element_size()
            tensor.set_(storage, element_offset, tensor.shape, tensor.stride())
            # The old copies leave as the new one fills: a large model's load should not hold
            # both whole.
            untrimmed += tensor.nbytes
            if untrimmed >= TRIM_EVERY_BYTES:
                release_freed_heap()
                untrimmed = 0
    release_freed_heap()
    return total


def release_freed_heap() -> None:
    """Hands the C heap's free pages back to the system (glibc's malloc_trim; elsewhere,
    nothing). The weights' old allocations, freed once they moved, otherwise stay resident: the
    default model in bfloat16 held 1,179 MiB after loading against 981 before the move, and
    910 with this."""
    libc = _linux_libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(ctypes.c_size_t(0))


def _linux_libc() -> ctypes.CDLL | None:
    """The process's C library where it is Linux's (madvise, malloc_trim); None elsewhere."""
    return ctypes.CDLL(None) if sys.platform.startswith("linux") else None
