"""One benchmark cell, measured in a fresh process: ``python -m bench.worker '<json spec>'``.

A cell is one (backend, loss, dtype, N, D) — or one bare GEMM (backend "gemm"). The worker builds the inputs,
warms up (this is where torch.compile compiles and Triton JIT-compiles), measures the peak memory of each pass,
then its median time, and prints one JSON object per pass on the last line of stdout:

    {"rows": [{"pass": "forward", "ms": 1.23, "mem": 4194304, "note": ""}, ...], "note": ""}

``ms`` / ``mem`` are null when a pass could not run (out of memory, compile failure, …); the note says why.
A fresh process per cell keeps CPU memory measurements clean (see ``bench.timing``), and an OOM or a crash in one
backend cannot disturb the next cell.

The workload: symmetric losses on L2-normalized rows with per-sample values, as MM-TS uses them —
τ_i ∈ [0.05, 0.15] for InfoNCE, m_i ∈ [0.1, 0.3] for max-margin.
"""
from __future__ import annotations

import json
import sys
import traceback

import torch

import mmts_kernels as mk

from .timing import MemoryProbeUnavailable, PeakMemory, median_ms

PASSES = ("forward", "backward", "full")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_inputs(N: int, D: int, dtype: torch.dtype, device: torch.device, loss: str):
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1).to(device, dtype).requires_grad_()
    y = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1).to(device, dtype).requires_grad_()
    lo, hi = (0.05, 0.15) if loss == "infonce" else (0.1, 0.3)
    per_sample = (lo + (hi - lo) * torch.rand(N, generator=g)).to(device)
    return x, y, per_sample


def loss_function(backend: str, loss: str):
    """``f(x, y, per_sample) -> scalar loss`` for a library backend, or the reference under torch.compile."""
    lib_backend = "torch" if backend == "torch_compile" else backend

    def f(x, y, per_sample):
        per_sample_kw = {"temperature" if loss == "infonce" else "margin": per_sample}
        return mk.contrastive_loss(x, y, loss=loss, backend=lib_backend, **per_sample_kw)

    if backend == "torch_compile":
        return torch.compile(f, dynamic=False)
    return f


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in first.lower():
        return "OOM"
    return f"{type(exc).__name__}: {first}"[:300]


def measure_loss(spec: dict) -> dict:
    device = torch.device(spec["device"])
    N, D, loss, repeats = spec["N"], spec["D"], spec["loss"], spec["repeats"]
    x, y, per_sample = make_inputs(N, D, DTYPES[spec["dtype"]], device, loss)
    f = loss_function(spec["backend"], loss)

    def forward():
        return f(x, y, per_sample)

    def full():
        f(x, y, per_sample).backward()

    def clear():
        x.grad = y.grad = None

    try:  # warm-up: compilation, JIT, thread pools, first touch of library code (the memory passes warm up further)
        full()
        clear()
    except Exception as exc:  # noqa: BLE001 — any failure becomes a note in the table, not a crash of the sweep
        if spec.get("debug"):
            traceback.print_exc()
        return {"rows": [], "note": _describe(exc)}

    rows, note = {p: {"pass": p, "ms": None, "mem": None, "note": ""} for p in PASSES}, ""
    if spec["measure"] == "time":
        return _time_loss(rows, forward, full, clear, device, repeats, (x, y))
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
        note = f"no memory measurement: {exc}"
    except Exception as exc:  # noqa: BLE001
        note = f"memory: {_describe(exc)}"
    return {"rows": list(rows.values()), "note": note}


def _time_loss(rows, forward, full, clear, device, repeats, leaves) -> dict:
    timers = {
        "forward": lambda: median_ms(forward, device, repeats=repeats, warmup=0, grad_to_none=leaves),
        "full": lambda: median_ms(full, device, repeats=repeats, warmup=0, grad_to_none=leaves),
        "backward": lambda: _time_backward(forward, device, repeats, leaves),
    }
    for p in PASSES:
        try:
            rows[p]["ms"] = timers[p]()
        except Exception as exc:  # noqa: BLE001
            rows[p]["note"] = _describe(exc)
        clear()
    return {"rows": list(rows.values()), "note": ""}


def _time_backward(forward, device: torch.device, repeats: int, leaves) -> float:
    """Backward alone: on GPU ``do_bench`` over ``backward(retain_graph=True)`` of one forward (as Liger does);
    on CPU a fresh untimed forward before every timed backward."""
    if device.type == "cuda":
        out = forward()
        try:
            return median_ms(lambda: out.backward(retain_graph=True), device, repeats=repeats, grad_to_none=leaves)
        except RuntimeError:  # a backend whose backward frees what it saved: time it after a fresh forward
            del out
    return median_ms(lambda out: out.backward(), device, repeats=repeats, warmup=0, setup=forward,
                     grad_to_none=leaves)


def measure_gemm(spec: dict) -> dict:
    """The ceiling: one bare N×D by D×N matmul in the same dtype (2·N·N·D flops)."""
    device = torch.device(spec["device"])
    N, D = spec["N"], spec["D"]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(N, D, generator=g).to(device, DTYPES[spec["dtype"]])
    b = torch.randn(N, D, generator=g).to(device, DTYPES[spec["dtype"]])
    row = {"pass": "forward", "ms": None, "mem": None, "note": ""}
    if spec["measure"] == "time":
        try:
            row["ms"] = median_ms(lambda: torch.matmul(a, b.T), device, repeats=spec["repeats"])
        except Exception as exc:  # noqa: BLE001
            row["note"] = _describe(exc)
        return {"rows": [row], "note": ""}
    try:
        torch.matmul(a, b.T)
        with PeakMemory(device) as m:
            out = torch.matmul(a, b.T)
        row["mem"] = m.bytes
        del out
    except MemoryProbeUnavailable as exc:
        row["note"] = f"no memory measurement: {exc}"
    except Exception as exc:  # noqa: BLE001
        row["note"] = _describe(exc)
    return {"rows": [row], "note": ""}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    result = measure_gemm(spec) if spec["backend"] == "gemm" else measure_loss(spec)
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
