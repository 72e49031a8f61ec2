"""`make bench` / `python -m bench`: every backend that runs here against the torch reference and against what users
would run instead, on this device, in the same run.

Backends: ``torch`` (the eager reference), ``torch_compile`` (the reference under ``torch.compile``), every fused
backend ``mk.available_backends()`` reports usable on the device (``cpp`` on CPU, ``triton`` on CUDA), and the
competitors of ``bench.competitors``: ``openclip`` (open_clip's ClipLoss with MM-TS's per-sample τ, eager),
``openclip_compile`` (it under torch.compile) and ``inf_cl`` (Inf-CL, scalar τ, InfoNCE only, when installed).
For each backend, each loss (symmetric InfoNCE with per-sample τ, symmetric max-margin with per-sample margins),
dtype and size: the median time of the forward, the backward and the full (forward+backward) pass with the
quartiles of its repeats, the peak memory of each, and TFLOP/s counting 8·N·M·D per forward+backward. Plus a bare
N×D·D×N GEMM per (dtype, N, D): the GEMM rate.

Where cells run (``bench.worker``): on CPU every cell in fresh processes (one for memory, one for time), because
the resident-set probe needs a fresh process; on CUDA all cells of one backend in one process (the allocator's
counters measure memory in any process, and torch/CUDA start once per backend, not once per cell). A backend that
runs out of memory at some N is not tried at larger N; one that fails otherwise (say, torch.compile without a
working compiler) is not tried again for that dtype — the table says why.

Outputs: a table on stdout; <out-dir>/<device>-<date>-<time>.csv, .md and .png — a new name per run, so a run never
overwrites earlier results (those committed under bench/results/ included).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import queue
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

import torch

import mmts_kernels as mk

from . import competitors, report
from .progress import progress
from .timing import MALLOC_ENV
from .worker import CELL_PREFIX, SkipRules

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "bench", "results")
LOSSES = ("infonce", "max_margin")
COMPILED = "torch_compile"

# Default sweeps. CPU: the whole default run stays within ~10 minutes on 2 cores. CUDA: the headline cell
# (bf16, N = 16384, D = 512) and a smaller N, bf16 and fp32, within ~8 minutes on one GPU — the torch.compile
# backends compile once per (loss, dtype, N) and dominate the time, so the default has few sizes.
SIZES = {"cpu": [1024, 2048, 4096], "cuda": [4096, 16384]}
DIMS = {"cpu": [256], "cuda": [512]}
FULL_SIZES = {"cpu": [1024, 2048, 4096, 8192, 16384], "cuda": [1024, 2048, 4096, 8192, 16384, 32768, 65536]}
FULL_DIMS = {"cpu": [256, 1024], "cuda": [256, 512, 1024]}
QUICK_SIZES = {"cpu": [1024, 2048], "cuda": [4096]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", help="N (= M) values (default: by device; see --quick/--full)")
    p.add_argument("--dims", type=int, nargs="+", help="D values (default 256 on CPU, 512 on GPU)")
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    p.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"],
                   help="default: float32, plus bfloat16 on GPU")
    p.add_argument("--backends", nargs="+",
                   help="subset of torch, torch_compile, the library's backends and the competitors "
                        f"{', '.join(competitors.COMPETITORS)} (default: all that run here)")
    p.add_argument("--no-gemm", action="store_true", help="skip the GEMM rate rows")
    p.add_argument("--repeats", type=int, help="timed repeats per pass on CPU (default 5; 3 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help=f"a short check: N in {QUICK_SIZES['cpu']} on CPU, {QUICK_SIZES['cuda']} on GPU; 3 repeats")
    p.add_argument("--full", action="store_true",
                   help=f"the long sweep: N up to {max(FULL_SIZES['cuda'])} and D in {FULL_DIMS['cuda']} on GPU "
                        f"(N up to {max(FULL_SIZES['cpu'])}, D in {FULL_DIMS['cpu']} on CPU)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out-dir", default=DEFAULT_OUT,
                   help="where the CSV, markdown and PNG go (new files named by device, date and time)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per cell before it is given up")
    p.add_argument("--workers", choices=["auto", "per-cell", "per-backend"], default="auto",
                   help="per-cell: fresh processes for every cell (clean CPU memory; slow: torch starts per cell); "
                        "per-backend: one process runs all cells of a backend; auto: per-backend on CUDA, per-cell "
                        "on CPU")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in each worker (default: torch's)")
    args = p.parse_args(argv)
    if args.quick and args.full:
        p.error("--quick and --full exclude each other")
    for name in ("sizes", "dims"):
        if any(v < 2 for v in getattr(args, name) or []):
            p.error(f"--{name} values must be >= 2")
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    return torch.device(choice)


def backends_to_run(device: torch.device, wanted: Optional[List[str]]):
    """(names to run, {name: reason} for those left out): torch and torch_compile first, then the fused ones, then
    the competitors."""
    skipped, names = {}, ["torch", COMPILED]
    for name, reason in _backend_reasons(device, wanted).items():
        if name == "torch":
            continue
        if reason is None and name == "triton" and device.type != "cuda":
            reason = "Triton kernels run on CUDA GPUs (the CPU interpreter is for tests only)"
        if reason is None:
            names.append(name)
        else:
            skipped[name] = reason
    for name in competitors.COMPETITORS:
        reason = competitors.unavailable_reason(name, device)
        if reason is None:
            names.append(name)
        else:
            skipped[name] = reason
    if wanted:
        known = set(names) | set(skipped) | set(getattr(mk.backends, "_MODULES", ()))
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise SystemExit(f"--backends: unknown {unknown}; known: {names + sorted(skipped)}")
        for w in wanted:
            if w in skipped:
                print(f"note: backend {w!r} is not available here: {skipped[w]}", file=sys.stderr)
        names = [n for n in names if n in wanted]
    return names, skipped


def _backend_reasons(device: torch.device, wanted: Optional[List[str]] = None) -> dict:
    """{backend: None if it runs on ``device``, else why not}, for the library's backends (only those in
    ``wanted`` when given: checking one may build it). A backend whose availability check itself fails (say, one
    half-installed) is reported with that error instead of stopping the benchmark."""
    names = list(getattr(mk.backends, "_MODULES", None) or mk.available_backends())
    if wanted:
        names = [n for n in names if n in wanted]
    reasons = {}
    for name in names:
        try:
            reasons[name] = mk.backends.unavailable_reason(name, device)
        except Exception as exc:  # noqa: BLE001
            reasons[name] = f"its availability check failed: {type(exc).__name__}: {exc}"
    return reasons


def run_cell(spec: dict, timeout: float) -> dict:
    """Measure one cell in two fresh worker processes: peak memory with ``MALLOC_ENV`` (every large block its own
    mapping, so RSS growth is the op's), then time with the default allocator — the memory setting makes every large
    allocation a fresh, page-faulting mapping, which would slow allocation-heavy code such as the reference."""
    memory = _run_worker({**spec, "measure": "memory"}, timeout, MALLOC_ENV)
    if not memory["rows"]:
        return memory
    timing = _run_worker({**spec, "measure": "time"}, timeout, {})
    by_pass = {row["pass"]: row for row in timing["rows"]}
    for row in memory["rows"]:
        timed = by_pass.get(row["pass"], {})
        for field in ("ms", "ms_q1", "ms_q3", "repeats"):
            row[field] = timed.get(field)
        row["note"] = "; ".join(n for n in (row["note"], timed.get("note", "")) if n)
    note = "; ".join(n for n in (memory["note"], timing["note"]) if n)
    return {"rows": memory["rows"], "note": note}


def _run_worker(spec: dict, timeout: float, extra_env: dict) -> dict:
    """Run one measurement in a fresh worker process; a crash or a timeout becomes a note."""
    env = dict(os.environ, **extra_env)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "bench.worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"rows": [], "note": f"timed out after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"rows": [], "note": f"worker exited with code {proc.returncode}: {tail}"[:300]}


def run_grouped(specs: List[dict], timeout: float, on_result) -> None:
    """Measure ``specs`` in one worker process (``bench.worker --batch``), calling ``on_result(spec, result)`` as
    each cell finishes. A cell that hangs past ``timeout`` seconds, or a worker that dies, costs that cell only:
    the worker is started again for the cells after it."""
    pending = list(specs)
    rules = SkipRules()  # the worker keeps its own; this one carries what was learnt across restarts
    while pending:
        for spec in list(pending):  # cells the rules already settle need no process
            note = rules.note_for(spec)
            if note:
                pending.remove(spec)
                on_result(spec, {"rows": [], "note": note})
        if not pending:
            return
        done, failure = _batch_process(pending, timeout, lambda i, res: (rules.record(pending[i], res),
                                                                         on_result(pending[i], res)))
        if failure is not None:  # the first cell without a result is the one that failed
            spec = pending[len(done)]
            result = {"rows": [], "note": failure}
            rules.record(spec, result)
            on_result(spec, result)
            done.add(len(done))
        pending = [s for i, s in enumerate(pending) if i not in done]


def _batch_process(specs: List[dict], timeout: float, on_cell):
    """Run one ``bench.worker --batch`` over ``specs``: (indices done, None) or (indices done, why it stopped)."""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "bench.worker", "--batch"], cwd=REPO_ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: "queue.Queue[Optional[str]]" = queue.Queue()
    err_tail: List[str] = []

    def read_stdout():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    def read_stderr():  # drained so a chatty compiler cannot fill the pipe and stall the worker
        for line in proc.stderr:
            err_tail[:] = (err_tail + [line.rstrip()])[-20:]

    threading.Thread(target=read_stdout, daemon=True).start()
    threading.Thread(target=read_stderr, daemon=True).start()
    proc.stdin.write(json.dumps(specs))
    proc.stdin.close()
    done = set()
    while len(done) < len(specs):
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            proc.kill()
            proc.wait()
            return done, f"timed out after {timeout:.0f} s"
        if line is None:
            code = proc.wait()
            tail = next((l for l in reversed(err_tail) if l.strip()), "no output")
            return done, f"worker exited with code {code}: {tail}"[:300]
        if line.startswith(CELL_PREFIX + " "):
            _, index, payload = line.split(" ", 2)
            done.add(int(index))
            on_cell(int(index), json.loads(payload))
    proc.wait()
    return done, None


def result_rows(spec: dict, result: dict, device_label: str) -> List[dict]:
    """CSV rows of one cell; a cell that produced nothing still gets rows (nan) that carry its note."""
    passes = ["forward"] if spec["backend"] == report.GEMM else ["forward", "backward", "full"]
    got = {r["pass"]: r for r in result.get("rows", [])}
    out = []
    for p in passes:
        r = got.get(p, {})
        ms = r.get("ms")
        ms = float("nan") if ms is None else float(ms)
        mem = r.get("mem")
        note = "; ".join(n for n in (result.get("note", ""), r.get("note", "")) if n)
        out.append(dict(
            device=device_label, backend=spec["backend"], loss=spec["loss"], dtype=spec["dtype"],
            N=spec["N"], M=spec["N"], D=spec["D"], **{"pass": p}, ms_median=ms,
            peak_mem_bytes=float("nan") if mem is None else int(mem),
            tflops=report.tflops(spec["backend"], p, spec["N"], spec["N"], spec["D"], ms),
            ms_q1=_float(r.get("ms_q1")), ms_q3=_float(r.get("ms_q3")), repeats=r.get("repeats") or 0, note=note,
        ))
    return out


def _float(v) -> float:
    return float("nan") if v is None else float(v)


def plan(args, device: torch.device, backends: List[str]) -> List[dict]:
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES if args.full else SIZES)[device.type]
    dims = args.dims or (FULL_DIMS if args.full else DIMS)[device.type]
    dtypes = args.dtypes or (["float32", "bfloat16"] if device.type == "cuda" else ["float32"])
    repeats = args.repeats or (3 if args.quick else 5)
    cells = []
    for dtype in dtypes:
        for D in dims:
            for N in sorted(sizes):
                base = dict(dtype=dtype, N=N, D=D, device=str(device), repeats=repeats, threads=args.threads)
                if not args.no_gemm:
                    cells.append(dict(base, backend=report.GEMM, loss="none"))
                cells += [dict(base, backend=b, loss=loss) for loss in args.losses for b in backends
                          if b not in competitors.COMPETITORS
                          or competitors.unavailable_reason(b, device, loss) is None]
    return cells


def main(argv=None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device)
    label = report.device_name(device)
    now = datetime.datetime.now()
    date = now.date().isoformat()
    backends, skipped = backends_to_run(device, args.backends)
    cells = plan(args, device, backends)
    print(f"device: {label} ({device.type}); torch {torch.__version__}; backends: {', '.join(backends)}"
          + "".join(f"\n  not run: {name} ({why})" for name, why in skipped.items()), flush=True)

    results: Dict[int, dict] = {}
    bar = progress(len(cells), "bench", enabled=not args.no_progress)
    start = time.perf_counter()

    def on_result(spec, result):
        results[spec["index"]] = result
        bar.set_postfix_str(f"{spec['backend']} {spec['loss']} {spec['dtype']} N={spec['N']} D={spec['D']}")
        bar.update()

    for i, spec in enumerate(cells):
        spec["index"] = i
    grouped = args.workers == "per-backend" or (args.workers == "auto" and device.type == "cuda")
    if grouped:
        for backend in dict.fromkeys(spec["backend"] for spec in cells):  # one worker per backend, in plan order
            run_grouped([s for s in cells if s["backend"] == backend], args.timeout, on_result)
    else:
        rules = SkipRules()
        for spec in cells:
            bar.set_postfix_str(f"{spec['backend']} {spec['loss']} {spec['dtype']} N={spec['N']} D={spec['D']}")
            note = rules.note_for(spec)
            result = {"rows": [], "note": note} if note else run_cell(spec, args.timeout)
            rules.record(spec, result)
            on_result(spec, result)
    bar.close()
    rows: List[dict] = []
    for spec in cells:
        rows += result_rows(spec, results[spec["index"]], label)

    print(report.format_table(rows))
    stem = report.new_stem(args.out_dir, report.file_stem(label, now.strftime("%Y-%m-%d-%H%M")),
                           (".csv", ".md", ".png"))
    report.write_csv(rows, stem + ".csv")
    meta = {
        "command": ("python -m bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None
                                                                           else argv))).rstrip(),
        "date": date, "device": f"{label} ({device.type})", "torch": torch.__version__,
        "python": platform.python_version(), "threads": str(args.threads or torch.get_num_threads()),
        "backends run": ", ".join(backends),
        "workers": ("one process per backend" if grouped else "fresh processes per cell (memory, then time)")
                   + (" (CPU memory then includes what earlier cells left in the process)"
                      if grouped and device.type == "cpu" else ""),
        "not run": "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "—",
        "wall time": f"{time.perf_counter() - start:.0f} s",
    }
    with open(stem + ".md", "x") as f:
        f.write(report.markdown(rows, meta))
    written = [stem + ".csv", stem + ".md"]
    if not args.no_plot:
        why = report.plot(rows, stem + ".png", title=f"{label} — {date}")
        if why:
            print(f"plot skipped: {why}")
        else:
            written.append(stem + ".png")
    print("wrote " + ", ".join(written))
    failed = [r for r in rows if not math.isfinite(r["ms_median"])]
    if failed:
        print(f"{len(failed)} of {len(rows)} measurements have no value; see the note column")


if __name__ == "__main__":
    main()
