"""Timing and memory measurement on the benchmark device.

CUDA: each run is bracketed by CUDA events and the median is reported; memory is the peak of
torch's caching allocator during one run minus what was allocated before it. CPU (smoke tests
only): wall-clock time, no memory figure.
"""

from __future__ import annotations

import gc
import statistics
import threading
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


class ClockSampler:
    """SM clock (MHz) and board power (W) sampled every `period_s` in a thread, where NVML
    answers through torch.cuda (pynvml installed); `available` says whether it did."""

    def __init__(self, device: torch.device, period_s: float = 0.02):
        self.device, self.period_s = device, period_s
        self.clocks: list[float] = []
        self.watts: list[float] = []
        self.available = False
        if device.type == "cuda":
            try:
                torch.cuda.clock_rate(device)
                torch.cuda.power_draw(device)
                self.available = True
            # No pynvml (ImportError), or NVML refused (pynvml.NVMLError, an Exception):
            # report nothing rather than guess.
            except Exception:  # noqa: BLE001
                self.available = False
        self._stop = threading.Event()
        self._thread = None

    def _run(self):
        while not self._stop.wait(self.period_s):
            self.clocks.append(float(torch.cuda.clock_rate(self.device)))
            self.watts.append(torch.cuda.power_draw(self.device) / 1e3)

    def __enter__(self):
        if self.available:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def describe(self) -> str:
        if not self.clocks:
            return "SM clock and power: not available (NVML through pynvml)"
        return (
            f"SM clock {statistics.median(self.clocks):.0f} MHz "
            f"(min {min(self.clocks):.0f}), board power {statistics.median(self.watts):.0f} W "
            f"(max {max(self.watts):.0f}), medians of {len(self.clocks)} samples"
        )

    def medians(self) -> tuple[float | None, float | None]:
        """Median SM clock (MHz) and board power (W) of the samples, or None without any."""
        if not self.clocks:
            return None, None
        return statistics.median(self.clocks), statistics.median(self.watts)
