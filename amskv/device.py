"""Device helpers: the one module besides the model code that calls ``torch.cuda``.

The KV manager asks here for free memory and allocator peaks, the engine for the device to run on, and the
server whether CUDA exists, so the rest of the code stays device-agnostic.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def cuda_available() -> bool:
    """Whether torch sees a CUDA device."""
    return torch.cuda.is_available()


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when torch sees a GPU, else cpu; ValueError for cuda without CUDA."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return torch.device(device)


def device_reserved_bytes() -> int:
    """Bytes the CUDA caching allocator holds (0 without CUDA), for servers that report device memory."""
    return torch.cuda.memory_reserved() if torch.cuda.is_available() else 0


def cuda_free_bytes(device: torch.device) -> int:
    """Free device memory plus the blocks our caching allocator holds but no tensor uses (reusable, though
    not "free" to the driver)."""
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def release_cached_blocks(device: torch.device) -> None:
    """Give the caching allocator's unused blocks back, e.g. after an out-of-memory error."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def cuda_peak(device: torch.device) -> Iterator[list[int]]:
    """Measure the allocator's peak above the bytes allocated on entry; the one-item list holds it on exit."""
    result = [0]
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    yield result
    torch.cuda.synchronize(device)
    result[0] = max(0, torch.cuda.max_memory_allocated(device) - baseline)
