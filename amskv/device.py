"""Device helpers: the one module besides the model code that calls ``torch.cuda``.

The KV manager asks here for free memory and allocator peaks, the engine for the device to run on, and the
server whether CUDA exists, so the rest of the code stays device-agnostic.
"""
from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.profiler


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


@dataclass(frozen=True)
class MemoryEvent:
    """One allocation (``nbytes`` > 0) or free (< 0) the allocator reported to torch.profiler."""

    ts_us: float
    thread: int
    address: int
    nbytes: int


@dataclass
class AllocatorTrace:
    """What ``allocator_trace`` recorded: the device's memory events in time order, and the profiler ranges
    (``torch.profiler.record_function``) by name, as (thread, start, end) in the events' clock."""

    events: list[MemoryEvent] = field(default_factory=list)
    ranges: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)

    def peak(self) -> int:
        """The allocator's peak above the bytes allocated on entry: the running sum of allocations and frees.
        Frees of blocks allocated before the trace are not reported on the CPU (their size is unknown), so
        they never lower it there; on CUDA they are, and the peak is still measured from the entry."""
        live = peak = 0
        for event in self.events:
            live += event.nbytes
            peak = max(peak, live)
        return peak

    def in_range(self, name: str, event: MemoryEvent) -> bool:
        return any(thread == event.thread and start <= event.ts_us <= end
                   for thread, start, end in self.ranges.get(name, ()))


@contextmanager
def allocator_trace(device: torch.device) -> Iterator[AllocatorTrace]:
    """Record the allocator's memory events on ``device`` with torch.profiler (``profile_memory=True``): the
    CPU has no allocator statistics of its own, so this is the measurement there; it works on CUDA too."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    trace = AllocatorTrace()
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        yield trace
    with tempfile.TemporaryDirectory() as folder:  # the exported trace is the public form with addresses
        path = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(path))
        raw = json.loads(path.read_text()).get("traceEvents", [])
    wanted = 1 if device.type == "cuda" else 0  # the trace's "Device Type": c10's DeviceType (CPU 0, CUDA 1)
    for item in raw:
        args = item.get("args", {})
        if item.get("name") == "[memory]" and args.get("Device Type") == wanted:
            trace.events.append(MemoryEvent(float(item["ts"]), int(item["tid"]), int(args["Addr"]),
                                            int(args["Bytes"])))
        elif item.get("cat") == "user_annotation" and "dur" in item:
            trace.ranges.setdefault(item["name"], []).append(
                (int(item["tid"]), float(item["ts"]), float(item["ts"]) + float(item["dur"])))
    trace.events.sort(key=lambda event: event.ts_us)


@contextmanager
def profiled_peak(device: torch.device) -> Iterator[list[int]]:
    """A peak meter like ``cuda_peak`` for any device, from torch.profiler's memory events (``allocator_trace``)."""
    result = [0]
    with allocator_trace(device) as trace:
        yield result
    result[0] = trace.peak()


class DeviceTimer:
    """Wall time between marks for work queued on ``device``, without draining it at every mark.

    On CUDA each ``mark`` records an event on the current stream and ``seconds`` waits once, for the last
    mark, then reads the event pairs; a ``torch.cuda.synchronize`` per mark (per scale) would stall the
    launch queue that many times. On the CPU a mark is ``time.perf_counter()``.
    """

    def __init__(self, device: torch.device) -> None:
        self._device = device if device.type == "cuda" else None
        self._marks: list = []
        self.mark()

    def mark(self) -> None:
        if self._device is None:
            self._marks.append(time.perf_counter())
            return
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self._device))
        self._marks.append(event)

    def seconds(self) -> list[float]:
        """Seconds between consecutive marks, in order; waits for the last mark's work on CUDA."""
        marks = self._marks
        if self._device is None:
            return [b - a for a, b in zip(marks, marks[1:], strict=False)]
        marks[-1].synchronize()
        return [a.elapsed_time(b) / 1000 for a, b in zip(marks, marks[1:], strict=False)]  # elapsed_time: ms
