"""Benchmark cells, measured in a worker process.

    python -m bench.worker '<json spec>'      one cell (the CPU path: a fresh process per cell and measurement)
    python -m bench.worker --batch < specs    a JSON list of cells in one process (the GPU path)

A cell is one (backend, loss, dtype, N, D) — or one bare GEMM (backend "gemm"). The worker builds the inputs,
warms up (this is where torch.compile compiles and Triton JIT-compiles), measures the peak memory of each pass
(``spec["measure"]`` "memory"), its time ("time"), or both ("both"), and prints

    {"rows": [{"pass": "forward", "ms": 1.23, "ms_q1": 1.2, "ms_q3": 1.3, "repeats": 80, "mem": 4194304,
               "note": ""}, ...], "note": ""}

one cell per line: the last line of stdout for one cell; ``BENCH-CELL <index> <json>`` lines in batch mode, each
printed as soon as its cell is done. ``ms`` / ``mem`` are null when a pass could not run (out of memory, compile
failure, …); the note says why.

Why two modes: CPU peak memory is the process's resident-set growth, which only a fresh process per measurement
reads cleanly (``bench.timing``). On CUDA the caching allocator's counters measure each op exactly in any process,
so one process serves all cells of a (dtype, backend): torch is imported and CUDA initialized once per group instead
of once per cell. Within a batch an OOM is caught and the cache emptied; the rules of ``SkipRules`` apply.

Backends: the library's (``torch``, ``cpp``, ``triton``), ``torch_compile`` (the reference under torch.compile) and
the competitors of ``bench.competitors`` (``openclip``, ``openclip_compile``, ``inf_cl``).

The workload: symmetric losses on L2-normalized rows with per-sample values, as MM-TS uses them —
τ_i ∈ [0.05, 0.15] for InfoNCE, m_i ∈ [0.1, 0.3] for max-margin.
"""
from __future__ import annotations

import gc
import json
import sys
import traceback
from typing import Dict, Optional

import torch

import mmts_kernels as mk

from . import competitors
from .timing import MemoryProbeUnavailable, PeakMemory, Timing, measure_ms

PASSES = ("forward", "backward", "full")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
COMPILED = ("torch_compile", "openclip_compile")
CELL_PREFIX = "BENCH-CELL"


def make_inputs(N: int, D: int, dtype: torch.dtype, device: torch.device, loss: str):
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1).to(device, dtype).requires_grad_()
    y = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1).to(device, dtype).requires_grad_()
    lo, hi = (0.05, 0.15) if loss == "infonce" else (0.1, 0.3)
    per_sample = (lo + (hi - lo) * torch.rand(N, generator=g)).to(device)
    return x, y, per_sample


def loss_function(backend: str, loss: str):
    """``f(x, y, per_sample) -> scalar loss`` for a library backend, the reference under torch.compile, or a
    competitor."""
    if backend in competitors.COMPETITORS:
        return competitors.loss_function(backend, loss)
    lib_backend = "torch" if backend == "torch_compile" else backend

    def f(x, y, per_sample):
        per_sample_kw = {"temperature" if loss == "infonce" else "margin": per_sample}
        return mk.contrastive_loss(x, y, loss=loss, backend=lib_backend, **per_sample_kw)

    if backend == "torch_compile":
        return torch.compile(f, dynamic=False)
    return f


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
    return measure_passes(lambda: f(x, y, per_sample), (x, y), device, spec["repeats"],
                          spec.get("measure", "both"), debug=spec.get("debug", False))


def measure_passes(forward, leaves, device: torch.device, repeats: int, measure: str = "both",
                   debug: bool = False) -> dict:
    """Forward, backward and forward+backward of ``forward()`` (a scalar loss of the ``leaves``): peak memory,
    time, or both, as the worker's result dict. The first call warms up (compilation, JIT, thread pools)."""
    def full():
        forward().backward()

    def clear():
        for t in leaves:
            t.grad = None

    try:
        full()
        clear()
    except Exception as exc:  # noqa: BLE001 — any failure becomes a note in the table, not a crash of the sweep
        if debug:
            traceback.print_exc()
        return {"rows": [], "note": describe(exc)}

    rows, note = {p: _empty_row(p) for p in PASSES}, ""
    if measure in ("memory", "both"):
        note = _memory_loss(rows, forward, full, clear, device)
    if measure in ("time", "both"):
        _time_loss(rows, forward, full, clear, device, repeats, leaves)
    return {"rows": list(rows.values()), "note": note}


def _memory_loss(rows, forward, full, clear, device) -> str:
    try:
        with PeakMemory(device) as m:
            out = forward()
        rows["forward"]["mem"] = m.bytes
        del out
        out = forward()
        with PeakMemory(device) as m:
            out.backward()
        rows["backward"]["mem"] = m.bytes
        del out
        clear()
        with PeakMemory(device) as m:
            full()
        rows["full"]["mem"] = m.bytes
        clear()
    except MemoryProbeUnavailable as exc:
        return f"no memory measurement: {exc}"
    except Exception as exc:  # noqa: BLE001
        clear()
        return f"memory: {describe(exc)}"
    return ""


def _time_loss(rows, forward, full, clear, device, repeats, leaves) -> None:
    timers = {
        "forward": lambda: measure_ms(forward, device, repeats=repeats, warmup=0, grad_to_none=leaves),
        "full": lambda: measure_ms(full, device, repeats=repeats, warmup=0, grad_to_none=leaves),
        "backward": lambda: _time_backward(forward, device, repeats, leaves),
    }
    for p in PASSES:
        try:
            _put_timing(rows[p], timers[p]())
        except Exception as exc:  # noqa: BLE001
            rows[p]["note"] = describe(exc)
        clear()


def _time_backward(forward, device: torch.device, repeats: int, leaves) -> Timing:
    """Backward alone: on GPU ``do_bench`` over ``backward(retain_graph=True)`` of one forward (as Liger does);
    on CPU a fresh untimed forward before every timed backward."""
    if device.type == "cuda":
        out = forward()
        try:
            return measure_ms(lambda: out.backward(retain_graph=True), device, repeats=repeats, grad_to_none=leaves)
        except RuntimeError:  # a backend whose backward frees what it saved: time it after a fresh forward
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
            _put_timing(row, measure_ms(lambda: torch.matmul(a, b.T), device, repeats=spec["repeats"]))
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


def run_batch(specs) -> None:
    """Measure ``specs`` in this process, one ``BENCH-CELL`` line per cell as each finishes."""
    rules = SkipRules()
    for index, spec in enumerate(specs):
        note = rules.note_for(spec)
        try:
            result = {"rows": [], "note": note} if note else measure_cell(spec)
        except Exception as exc:  # noqa: BLE001 — e.g. inputs that do not fit: the next cells still run here
            result = {"rows": [], "note": describe(exc)}
        rules.record(spec, result)
        sys.stdout.write(f"{CELL_PREFIX} {index} {json.dumps(result)}\n")
        sys.stdout.flush()
        if spec["backend"] in COMPILED:  # one compiled graph per shape: do not let the cache hit dynamo's limit
            torch._dynamo.reset()
        gc.collect()
        if spec["device"].startswith("cuda"):
            torch.cuda.empty_cache()


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    batch = argv[:1] == ["--batch"]
    specs = json.loads(sys.stdin.read()) if batch else [json.loads(argv[0])]
    if specs and specs[0].get("threads"):
        torch.set_num_threads(int(specs[0]["threads"]))
    if batch:
        run_batch(specs)
        return
    result = measure_cell(specs[0])
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
