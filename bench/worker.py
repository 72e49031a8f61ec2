"""Benchmark cells, measured in a worker process that serves many cells.

    python -m bench.worker        reads one JSON cell spec per line on stdin, answers each with one line

On start the worker prints ``BENCH-READY <pid>`` (torch and the library imported); for each cell it prints
``BENCH-CELL <json>``, the JSON being

    {"rows": [{"pass": "forward", "ms": 1.23, "ms_q1": 1.2, "ms_q3": 1.3, "repeats": 80, "mem": 4194304,
               "note": ""}, ...], "note": "", "pid": 1234}

``ms`` / ``mem`` are null when a pass could not run (out of memory, compile failure, …); the note says why.
A cell is one (backend, loss, dtype, N, D), or one bare GEMM (backend "gemm"); ``spec["measure"]`` is "memory",
"time" or "both". The worker builds the inputs, warms up (this is where torch.compile compiles, once per cell and
shape, and Triton JIT-compiles), then measures; between cells it drops torch.compile's graphs and CUDA's cache.

``python -m bench`` keeps one worker per backend for the times and, on the CPU, one more for all peak memories,
started with ``bench.timing.MALLOC_ENV`` (why: ``bench.timing``). On CUDA the caching allocator's counters measure
each op exactly in any process, so the backend's worker measures both.

Backends: the library's (``torch``, ``cpp``, ``triton``), ``torch_compile`` (the reference under torch.compile) and
the competitors of ``bench.competitors`` (``openclip``, ``openclip_compile``, ``openclip_chunked``, ``inf_cl``).
Losses: ``LOSSES``.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

import mmts_kernels as mk

from . import competitors
from .timing import (MemoryProbeUnavailable, PeakMemory, Timing, forward_backward_peaks, measure_adaptive_ms,
                     measure_ms, time_forward_backward)

PASSES = ("forward", "backward", "full")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
COMPILED = ("torch_compile", "openclip_compile")
READY_PREFIX, CELL_PREFIX = "BENCH-READY", "BENCH-CELL"
CUDA_EVENT_REPEATS = 5  # CUDA without triton's do_bench (which picks its own count): CUDA events over this many


@dataclass(frozen=True)
class BenchLoss:
    """One loss of the benchmark: how the library computes it and how users write it in plain PyTorch.

    library(x, y, per_sample, backend) and plain(x, y, per_sample) return the scalar loss of x, y [N, D] (row i's
    positive is row i of the other side); per_sample is an [N] tensor drawn uniformly from ``per_sample``. ``plain``
    is what the ``openclip`` and ``openclip_compile`` rows run (eager and under torch.compile). ``summary`` says
    what is measured, in the results file."""

    library: Callable[..., torch.Tensor]
    plain: Callable[..., torch.Tensor]
    per_sample: Tuple[float, float]
    summary: str


# The losses `python -m bench --losses` offers; a new row of the table is one more entry here.
LOSSES: Dict[str, BenchLoss] = {
    "infonce": BenchLoss(lambda x, y, tau, backend: mk.info_nce(x, y, tau, backend=backend),
                         competitors.openclip_infonce, (0.05, 0.15),
                         "symmetric InfoNCE, per-sample τ_i ∈ [0.05, 0.15]"),
    "max_margin": BenchLoss(lambda x, y, m, backend: mk.max_margin(x, y, m, backend=backend),
                            competitors.openclip_max_margin, (0.1, 0.3),
                            "symmetric max-margin over all negatives, per-sample m_i ∈ [0.1, 0.3]"),
    # x, y are the two views z1, z2 of B = N samples: 2B anchors against the masked 2B × 2B similarity.
    "nt_xent": BenchLoss(lambda z1, z2, tau, backend: mk.nt_xent(z1, z2, tau, backend=backend),
                         competitors.plain_nt_xent, (0.05, 0.15),
                         "SimCLR NT-Xent (2B anchors of two views of B = N samples), per-sample τ_i ∈ [0.05, 0.15]"),
    "sigmoid": BenchLoss(lambda x, y, tau, backend: mk.sigmoid_loss(x, y, tau, competitors.SIGLIP_BIAS,
                                                                    backend=backend),
                         competitors.openclip_siglip, (0.05, 0.15),
                         f"SigLIP sigmoid loss, per-sample τ_i ∈ [0.05, 0.15], bias {competitors.SIGLIP_BIAS:g} "
                         "(open_clip's init)"),
}
# Competitors with their own function instead of a loss's ``plain`` one.
OWN_FUNCTION = ("inf_cl", "openclip_chunked")


def make_inputs(N: int, D: int, dtype: torch.dtype, device: torch.device, loss: str):
    """L2-normalized x, y [N, D] and the per-sample values of ``loss``, the same for every backend (seed 0)."""
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1).to(device, dtype).requires_grad_()
    y = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1).to(device, dtype).requires_grad_()
    lo, hi = LOSSES[loss].per_sample
    per_sample = (lo + (hi - lo) * torch.rand(N, generator=g)).to(device)
    return x, y, per_sample


def loss_function(backend: str, loss: str):
    """``f(x, y, per_sample) -> scalar loss`` for a library backend, the reference under torch.compile, or a
    competitor."""
    case = LOSSES[loss]
    if backend in OWN_FUNCTION:
        return competitors.loss_function(backend, loss)
    if backend in ("openclip", "openclip_compile"):
        f = case.plain
    else:
        lib_backend = "torch" if backend == "torch_compile" else backend

        def f(x, y, per_sample):
            return case.library(x, y, per_sample, lib_backend)

    return torch.compile(f, dynamic=False) if backend in COMPILED else f


def describe(exc: BaseException) -> str:
    """A one-line note for a failure; "OOM" for out of memory (the sweep skips larger N after it)."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in first.lower():
        return "OOM"
    return f"{type(exc).__name__}: {first}"[:300]


def _empty_row(p: str) -> dict:
    return {"pass": p, "ms": None, "ms_q1": None, "ms_q3": None, "repeats": None, "mem": None, "note": ""}


def _put_timing(row: dict, t: Timing) -> None:
    row.update(ms=t.median, ms_q1=t.q1, ms_q3=t.q3, repeats=t.n)


def measure_loss(spec: dict) -> dict:
    device = torch.device(spec["device"])
    x, y, per_sample = make_inputs(spec["N"], spec["D"], DTYPES[spec["dtype"]], device, spec["loss"])
    f = loss_function(spec["backend"], spec["loss"])
    return measure_passes(lambda: f(x, y, per_sample), (x, y), device, spec.get("repeats"),
                          spec.get("measure", "both"), debug=spec.get("debug", False))


def measure_passes(forward, leaves, device: torch.device, repeats: Optional[int], measure: str = "both",
                   debug: bool = False) -> dict:
    """Forward, backward and forward+backward of ``forward()`` (a scalar loss of the ``leaves``): peak memory,
    time, or both, as the worker's result dict. The first call warms up (compilation, JIT, thread pools).
    ``repeats``: timed repeats (CUDA: ``do_bench`` chooses); None on the CPU: as many as the spread needs."""
    def clear():
        for t in leaves:
            t.grad = None

    try:
        forward().backward()
        clear()
    except Exception as exc:  # noqa: BLE001 — any failure becomes a note in the table, not a crash of the sweep
        if debug:
            traceback.print_exc()
        return {"rows": [], "note": describe(exc)}

    rows, note = {p: _empty_row(p) for p in PASSES}, ""
    if measure in ("memory", "both"):
        try:
            for p, nbytes in forward_backward_peaks(forward, device).items():
                rows[p]["mem"] = nbytes
        except MemoryProbeUnavailable as exc:
            note = f"no memory measurement: {exc}"
        except Exception as exc:  # noqa: BLE001
            note = f"memory: {describe(exc)}"
        clear()
    if measure in ("time", "both"):
        _time_loss(rows, forward, clear, device, repeats, leaves)
    return {"rows": list(rows.values()), "note": note}


def _time_loss(rows, forward, clear, device, repeats, leaves) -> None:
    if device.type != "cuda":  # one loop times all three passes
        try:
            for p, t in time_forward_backward(forward, leaves, repeats=repeats).items():
                _put_timing(rows[p], t)
        except Exception as exc:  # noqa: BLE001
            for p in PASSES:
                rows[p]["note"] = describe(exc)
        clear()
        return

    def full():
        forward().backward()

    n = repeats or CUDA_EVENT_REPEATS
    timers = {
        "forward": lambda: measure_ms(forward, device, repeats=n, warmup=0, grad_to_none=leaves),
        "full": lambda: measure_ms(full, device, repeats=n, warmup=0, grad_to_none=leaves),
        "backward": lambda: _time_backward_cuda(forward, device, n, leaves),
    }
    for p in PASSES:
        try:
            _put_timing(rows[p], timers[p]())
        except Exception as exc:  # noqa: BLE001
            rows[p]["note"] = describe(exc)
        clear()


def _time_backward_cuda(forward, device: torch.device, repeats: int, leaves) -> Timing:
    """Backward alone: ``do_bench`` over ``backward(retain_graph=True)`` of one forward (as Liger does); after a
    fresh untimed forward per repeat when the backend's backward frees what it saved."""
    out = forward()
    try:
        return measure_ms(lambda: out.backward(retain_graph=True), device, repeats=repeats, grad_to_none=leaves)
    except RuntimeError:
        del out
    return measure_ms(lambda out: out.backward(), device, repeats=repeats, warmup=0, setup=forward,
                      grad_to_none=leaves)


def measure_gemm(spec: dict) -> dict:
    """The GEMM rate: one bare N×D by D×N matmul in the same dtype (2·N·N·D flops)."""
    device = torch.device(spec["device"])
    N, D = spec["N"], spec["D"]
    measure = spec.get("measure", "both")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(N, D, generator=g).to(device, DTYPES[spec["dtype"]])
    b = torch.randn(N, D, generator=g).to(device, DTYPES[spec["dtype"]])
    row = _empty_row("forward")
    try:
        torch.matmul(a, b.T)
        if measure in ("memory", "both"):
            try:
                with PeakMemory(device) as m:
                    out = torch.matmul(a, b.T)
                row["mem"] = m.bytes
                del out
            except MemoryProbeUnavailable as exc:
                row["note"] = f"no memory measurement: {exc}"
        if measure in ("time", "both"):
            repeats = spec.get("repeats")
            if repeats is None and device.type != "cuda":
                timing = measure_adaptive_ms(lambda: torch.matmul(a, b.T))
            else:
                timing = measure_ms(lambda: torch.matmul(a, b.T), device, repeats=repeats or CUDA_EVENT_REPEATS)
            _put_timing(row, timing)
    except Exception as exc:  # noqa: BLE001
        row["note"] = describe(exc)
    return {"rows": [row], "note": ""}


def measure_cell(spec: dict) -> dict:
    return measure_gemm(spec) if spec["backend"] == "gemm" else measure_loss(spec)


class SkipRules:
    """Which cells of a sweep not to try: after an OOM no larger N for that (backend, loss, dtype, D); after any
    other failure of a whole cell (say, torch.compile without a working compiler) nothing more of that
    (backend, dtype). Cells must come in increasing N for the OOM rule to save time."""

    def __init__(self):
        self.blocked: Dict[tuple, str] = {}
        self.broken: Dict[tuple, str] = {}

    def note_for(self, spec: dict) -> Optional[str]:
        key, bkey = (spec["backend"], spec["loss"], spec["dtype"], spec["D"]), (spec["backend"], spec["dtype"])
        return self.blocked.get(key) or self.broken.get(bkey)

    def record(self, spec: dict, result: dict) -> None:
        key, bkey = (spec["backend"], spec["loss"], spec["dtype"], spec["D"]), (spec["backend"], spec["dtype"])
        rows = result.get("rows", [])
        if result.get("note") == "OOM" or any(r.get("note") == "OOM" for r in rows):
            self.blocked.setdefault(key, f"skipped: OOM at N={spec['N']}")
        elif not rows and result.get("note") and not result["note"].startswith("skipped"):
            self.broken.setdefault(bkey, f"{result['note']} (at N={spec['N']})")


def serve(lines, out=sys.stdout) -> None:
    """Measure each cell spec of ``lines`` (JSON, one per line) in this process, answering each with one line."""
    out.write(f"{READY_PREFIX} {os.getpid()}\n")
    out.flush()
    threads_set = False
    for line in lines:
        if not line.strip():
            continue
        spec = json.loads(line)
        if spec.get("threads") and not threads_set:
            torch.set_num_threads(int(spec["threads"]))
            threads_set = True
        try:
            result = measure_cell(spec)
        except Exception as exc:  # noqa: BLE001 — e.g. inputs that do not fit: the next cells still run here
            result = {"rows": [], "note": describe(exc)}
        result["pid"] = os.getpid()
        out.write(f"\n{CELL_PREFIX} {json.dumps(result)}\n")  # on a line of its own, whatever was printed before
        out.flush()
        if spec["backend"] in COMPILED:  # one compiled graph per shape: do not let the cache hit dynamo's limit
            torch._dynamo.reset()
        gc.collect()
        if spec["device"].startswith("cuda"):
            torch.cuda.empty_cache()


if __name__ == "__main__":
    serve(sys.stdin)
