"""How much memory a device has left for the weights and the KV cache."""

from pathlib import Path

import torch


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
