"""Timers and peak-memory probes for one operation.

Time
    GPU: ``triton.testing.do_bench`` (every repeat it made; it warms up and flushes the L2 cache itself); CUDA
         events around each call when triton is not importable.
    CPU: ``warmup`` untimed calls, then ``repeats`` ``perf_counter`` timings. A ``setup`` callable, when given,
         runs untimed before every call (e.g. the forward whose backward is being timed).
    Reported: the median and the quartiles of the repeats (``Timing``), so a noisy measurement shows as a wide
    interquartile range instead of passing for a clean one.

Memory: the growth an operation causes over what was allocated before it, never the process baseline.
    GPU: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
         ``memory_allocated()`` before the op (the caching allocator's exact counters).
    CPU: the resident set of the process. Writing "5" to ``/proc/self/clear_refs`` resets the high-water mark
         VmHWM to the current VmRSS (Linux ≥ 4.0); the op's growth is VmHWM after it minus VmRSS before it.
         Run it in a fresh process started with ``MALLOC_ENV`` (``bench.worker`` does), so that glibc serves every
         large buffer with mmap and gives it back on free: otherwise a buffer freed by one measurement stays in
         the heap, the next measurement reuses it, and its growth reads as zero. Resolution: 4 KiB pages.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

# Environment for the worker process (glibc reads it at start-up): allocations ≥ 256 KiB are mmapped and unmapped
# on free; setting the threshold explicitly also turns off glibc's dynamic threshold, which would otherwise move
# large buffers back onto the heap after the first free.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(256 * 1024), "MALLOC_TRIM_THRESHOLD_": str(1024 * 1024)}


class MemoryProbeUnavailable(RuntimeError):
    """The peak memory of an op cannot be measured on this machine (the message says why)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Summary of the timed repeats of one operation, in milliseconds: median and quartiles (``q1``/``q3``, linear
    interpolation between the sorted repeats; with one repeat all three are that repeat)."""

    median: float
    q1: float
    q3: float
    n: int

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median: how far apart the repeats were."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else math.nan

    @classmethod
    def of(cls, times_ms: Sequence[float]) -> "Timing":
        ts = sorted(float(t) for t in times_ms)
        if not ts:
            raise ValueError("no timings")
        return cls(median=statistics.median(ts), q1=_quantile(ts, 0.25), q3=_quantile(ts, 0.75), n=len(ts))


def _quantile(sorted_ts: Sequence[float], q: float) -> float:
    pos = q * (len(sorted_ts) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_ts) - 1)
    return sorted_ts[lo] + (sorted_ts[hi] - sorted_ts[lo]) * (pos - lo)


def measure_ms(fn: Callable[[], object], device: torch.device, *, repeats: int = 5, warmup: int = 1,
               setup: Optional[Callable[[], object]] = None, grad_to_none=()) -> Timing:
    """The repeats of ``fn()`` (``fn(setup())`` when ``setup`` is given), summarized in milliseconds.

    On CUDA without ``setup`` this is ``triton.testing.do_bench`` (its own warm-up, L2 flush before each call, as
    many repeats as fit in 100 ms, at least one; ``repeats`` is ignored); ``grad_to_none`` tensors get
    ``.grad = None`` before every call so gradient accumulation does not add an extra kernel.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if device.type == "cuda" and setup is None:
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            return Timing.of(do_bench(fn, grad_to_none=list(grad_to_none) or None, return_mode="all"))

    def call():
        for t in grad_to_none:
            t.grad = None
        return fn() if setup is None else fn(setup())

    for _ in range(warmup):
        call()
        _sync(device)
    times = []
    for _ in range(repeats):
        for t in grad_to_none:
            t.grad = None
        arg = None if setup is None else setup()
        _sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn() if setup is None else fn(arg)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn() if setup is None else fn(arg)
            times.append((time.perf_counter() - t0) * 1e3)
        del arg
    return Timing.of(times)


def median_ms(fn: Callable[[], object], device: torch.device, **kwargs) -> float:
    """``measure_ms(...).median``."""
    return measure_ms(fn, device, **kwargs).median


# ---------------------------------------------------------------------------------------------------------------
# Peak memory

def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise MemoryProbeUnavailable(f"/proc/self/status has no {field} field")


def _reset_rss_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:
        raise MemoryProbeUnavailable(f"cannot reset the RSS high-water mark via /proc/self/clear_refs: {exc}")


def cpu_probe_reason() -> Optional[str]:
    """None when the CPU peak-memory probe works in this process, else why not."""
    try:
        _reset_rss_peak()
        _proc_status_kib("VmHWM")
        _proc_status_kib("VmRSS")
    except (MemoryProbeUnavailable, OSError) as exc:
        return str(exc)
    return None


class PeakMemory:
    """``with PeakMemory(device) as m: op()`` then ``m.bytes``: the op's peak growth over the memory before it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes: Optional[int] = None

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _reset_rss_peak()
            self._base = _proc_status_kib("VmRSS") * 1024
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._base)
        else:
            self.bytes = max(0, _proc_status_kib("VmHWM") * 1024 - self._base)
