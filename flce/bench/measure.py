"""Timing and memory measurement on the benchmark device.

CUDA: each run is bracketed by CUDA events and the median is reported; memory is the peak of
torch's caching allocator during one run minus what was allocated before it. CPU (smoke tests
only): wall-clock time, no memory figure.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import torch


def free_memory(device: torch.device, collect: bool = True) -> None:
    """Returns cached device memory; `collect` also runs the garbage collector (~0.1 s with
    torch loaded, so it is done between methods, not between the phases of one)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def time_runs(
    fn: Callable[[], object],
    device: torch.device,
    iters: int,
    before: Callable[[], None] | None = None,
) -> float:
    """Median milliseconds of `iters` calls of fn; `before` runs outside the timed region."""
    times = []
    if device.type == "cuda":
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(iters)
        ]
        for start, end in events:
            if before is not None:
                before()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(iters):
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class PeakMemory:
    """Extra device memory of the enclosed code: peak allocated minus allocated at entry.

    `extra` stays None off CUDA, where torch's allocator keeps no statistics.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.extra: int | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda" and exc[0] is None:
            torch.cuda.synchronize(self.device)
            self.extra = torch.cuda.max_memory_allocated(self.device) - self._before
        return False


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def describe_error(e: BaseException, limit: int = 300) -> str:
    if is_oom(e):
        return "OOM (out of device memory)"
    text = " ".join(str(e).split())
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"{type(e).__name__}: {text}"
