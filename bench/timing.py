"""Timers and peak-memory probes for one operation.

Time
    GPU: ``triton.testing.do_bench`` (every repeat it made; it warms up and flushes the L2 cache itself); CUDA
         events around each call when triton is not importable.
    CPU: ``warmup`` untimed calls, then ``repeats`` ``perf_counter`` timings. A ``setup`` callable, when given,
         runs untimed before every call (e.g. the forward whose backward is being timed).
         ``time_forward_backward`` times forward, backward and both from the same calls (the forward's clock stops
         where the backward's starts), as many repeats as the spread needs (``adaptive_enough``).
    Reported: the median and the quartiles of the repeats (``Timing``), so a noisy measurement shows as a wide
    interquartile range instead of passing for a clean one.

Memory: the growth an operation causes over what was allocated before it, never the process baseline.
    GPU: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
         ``memory_allocated()`` before the op (the caching allocator's exact counters).
    CPU: the resident set of the process. Writing "5" to ``/proc/self/clear_refs`` resets the high-water mark
         VmHWM to the current VmRSS (Linux ≥ 4.0); the op's growth is VmHWM after it minus VmRSS before it.
         Run it in a process started with ``MALLOC_ENV`` (``bench.worker``'s memory worker is), so that glibc serves
         every large buffer with mmap and gives it back on free: otherwise a buffer freed by one measurement stays
         in the heap, the next measurement reuses it, and its growth reads as zero. With every large buffer its
         own mapping, one such process measures any number of cells (what is left over from earlier cells is in
         the baseline, not in the growth). Resolution: 4 KiB pages. The setting cannot be switched at run time
         (``mallopt`` leaves the free chunks already in the heap to be reused), and it slows allocation-heavy code,
         so times come from a process without it.
    ``forward_backward_peaks`` reads the forward, the backward and the whole from one forward+backward call.
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


# Adaptive repeats on the CPU: at least ``min_repeats``; a cheap op repeats until MIN_TIMED_S of timing (more
# repeats cost little and steady the median); a noisy one (spread above STEADY_SPREAD) gets more repeats, until
# 3 × ``min_repeats`` or NOISY_BUDGET_S of timing, whichever comes first.
MIN_TIMED_S = 0.3
MAX_REPEATS = 50
STEADY_SPREAD = 0.10
NOISY_BUDGET_S = 2.0


def adaptive_enough(times_ms: Sequence[float], min_repeats: int) -> bool:
    """Whether ``times_ms`` (the repeats so far) are enough, by the rule above."""
    n, total_s = len(times_ms), sum(times_ms) / 1e3
    if n < min_repeats:
        return False
    if n >= MAX_REPEATS:
        return True
    if total_s < MIN_TIMED_S:
        return False
    return Timing.of(times_ms).spread <= STEADY_SPREAD or n >= 3 * min_repeats or total_s >= NOISY_BUDGET_S


def measure_adaptive_ms(fn: Callable[[], object], min_repeats: int = 3) -> Timing:
    """CPU: the repeats of ``fn()`` (warmed up by the caller), as many as ``adaptive_enough`` asks for."""
    times: list = []
    while not adaptive_enough(times, min_repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing.of(times)


def time_forward_backward(forward: Callable[[], torch.Tensor], leaves=(), *, repeats: Optional[int] = None,
                          min_repeats: int = 3) -> dict:
    """CPU: {"forward", "backward", "full": Timing} of ``forward()`` (a scalar loss) and its ``backward()``,
    each repeat timing both halves of one call. ``repeats``: exactly that many; None: ``adaptive_enough`` on the
    forward+backward times. The caller has warmed up. ``leaves`` get ``.grad = None`` before every repeat."""
    if repeats is not None and repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    fwd, bwd, full = [], [], []
    while (len(full) < repeats) if repeats is not None else not adaptive_enough(full, min_repeats):
        for t in leaves:
            t.grad = None
        t0 = time.perf_counter()
        out = forward()
        t1 = time.perf_counter()
        out.backward()
        t2 = time.perf_counter()
        del out
        fwd.append((t1 - t0) * 1e3)
        bwd.append((t2 - t1) * 1e3)
        full.append((t2 - t0) * 1e3)
    for t in leaves:
        t.grad = None
    return {"forward": Timing.of(fwd), "backward": Timing.of(bwd), "full": Timing.of(full)}


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
    """``with PeakMemory(device) as m: op()`` then ``m.bytes``: the op's peak growth over the memory before it
    (``m.base``)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes: Optional[int] = None
        self.base = 0

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _reset_rss_peak()
            self.base = _proc_status_kib("VmRSS") * 1024
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self.base)
        else:
            self.bytes = max(0, _proc_status_kib("VmHWM") * 1024 - self.base)


def forward_backward_peaks(forward: Callable[[], torch.Tensor], device: torch.device) -> dict:
    """{"forward", "backward", "full": bytes} from one ``forward().backward()``: the forward's peak growth, the
    backward's over what the forward left (its output and saved tensors), and the whole call's, which is the larger
    of the forward's peak and what the forward left plus the backward's peak."""
    with PeakMemory(device) as f:
        out = forward()
    with PeakMemory(device) as b:
        out.backward()
    del out
    left = b.base - f.base  # the forward's output and the tensors it saved for the backward
    return {"forward": f.bytes, "backward": b.bytes, "full": max(f.bytes, left + b.bytes)}
