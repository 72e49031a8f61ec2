"""`make bench` / `python -m bench`: every backend that runs here against the torch reference and against what users
would run instead, on this device, in the same run.

Backends: ``torch`` (the eager reference), the competitors of ``bench.competitors`` — ``openclip`` (open_clip's
ClipLoss with MM-TS's per-sample τ, or its own SigLipLoss for the sigmoid loss, eager), ``openclip_compile`` (it
under torch.compile), ``openclip_chunked`` (open_clip's chunked SigLipLoss, sigmoid only) and ``inf_cl`` (Inf-CL,
scalar τ, InfoNCE only, when installed) —, ``torch_compile`` (the reference under torch.compile) and every fused
backend ``mk.available_backends()`` reports usable on the device (``cpp`` on CPU, ``triton`` on CUDA). Losses:
``bench.worker.LOSSES`` (symmetric InfoNCE with per-sample τ, symmetric max-margin with per-sample margins, SimCLR
NT-Xent, SigLIP's sigmoid loss with per-sample τ and a bias).
For each backend, loss, dtype and size: the median time of the forward, the backward and the full
(forward+backward) pass with the spread of its repeats, the peak memory of each, and TFLOP/s counting 8·N·M·D per
forward+backward; plus a bare N×D·D×N GEMM per (dtype, N, D): the GEMM rate.

Default sweep. CPU: fp32, D = 256, N in {1024, 2048}, the four losses (44 cells; under 2 minutes on 2 cores,
up to 4 when other work loads them). The issue's CPU goal cell (fused sigmoid against open_clip's eager SigLipLoss
at N = 4096, D = 256): ``python -m bench --losses sigmoid --sizes 4096``.
CUDA: bf16 and fp32, D = 512, N in {4096, 16384}. ``--full``: the long sweep (it includes what the default swept
before: N in {1024, 2048, 4096} on CPU); ``--quick``: one size.

Where cells run: a pool of ``bench.worker`` processes, started once: one per backend (the GEMM with the reference),
so torch starts once per backend and torch.compile compiles each (loss, shape) once per worker, and on the CPU one
more, started with ``bench.timing.MALLOC_ENV``, that measures every cell's peak memory (a resident-set probe that
needs every large buffer to be its own mapping, which would slow the timed runs; its compiles of the same graphs
mostly hit inductor's on-disk cache). One cell runs at a time; the others wait. A worker
that hangs past ``--timeout`` or dies costs its cell only (a fresh one takes the next). ``--workers per-cell`` starts
fresh workers for every cell instead. A backend that runs out of memory at some N is not tried at larger N; one
that fails otherwise (say, torch.compile without a working compiler) is not tried again for that dtype — the
table says why.

Outputs: each line as its cell finishes, then the whole table (at most 120 characters wide); files
<out-dir>/<device>-<date>-<time>.csv, .md and .png — a new name per run, so a run never overwrites earlier results
(those committed under bench/results/ included). The CSV and the markdown are written as cells finish: Ctrl-C
stops the run, keeps them (the markdown says it was interrupted) and prints the table of what finished.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import queue
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Dict, List, Optional

STARTED = time.perf_counter()  # before torch is imported: the wall time recorded is the whole command's

import torch  # noqa: E402

import mmts_kernels as mk  # noqa: E402

from . import competitors, report  # noqa: E402
from .progress import progress  # noqa: E402
from .timing import MALLOC_ENV  # noqa: E402
from .worker import CELL_PREFIX, LOSSES, READY_PREFIX, SkipRules  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "bench", "results")
COMPILED = "torch_compile"
# The order of the lines within a (loss, N): the reference and what users run instead first, so that the ratios
# of the lines after them are known as they print; then the library's compiled reference and its fused backends.
LEAD_ORDER = ("torch", "openclip", "openclip_compile", "openclip_chunked", "inf_cl", COMPILED)
MEMORY_WORKER = "memory"
STARTUP_TIMEOUT_S = 300.0

SIZES = {"cpu": [1024, 2048], "cuda": [4096, 16384]}
DIMS = {"cpu": [256], "cuda": [512]}
FULL_SIZES = {"cpu": [1024, 2048, 4096, 8192, 16384], "cuda": [1024, 2048, 4096, 8192, 16384, 32768, 65536]}
FULL_DIMS = {"cpu": [256, 1024], "cuda": [256, 512, 1024]}
QUICK_SIZES = {"cpu": [1024], "cuda": [4096]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", help="N (= M) values (default: by device; see --quick/--full)")
    p.add_argument("--dims", type=int, nargs="+", help="D values (default 256 on CPU, 512 on GPU)")
    p.add_argument("--losses", nargs="+", choices=list(LOSSES), default=list(LOSSES))
    p.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"],
                   help="default: float32, plus bfloat16 on GPU")
    p.add_argument("--backends", nargs="+",
                   help="subset of torch, torch_compile, the library's backends and the competitors "
                        f"{', '.join(competitors.COMPETITORS)} (default: all that run here)")
    p.add_argument("--no-gemm", action="store_true", help="skip the GEMM rate rows")
    p.add_argument("--repeats", type=int,
                   help="exactly this many timed repeats per pass (default on CPU: at least 3, more while they are "
                        "cheap or spread out; on GPU do_bench chooses)")
    p.add_argument("--quick", action="store_true",
                   help=f"a short check: N in {QUICK_SIZES['cpu']} on CPU, {QUICK_SIZES['cuda']} on GPU")
    p.add_argument("--full", action="store_true",
                   help=f"the long sweep: N in {FULL_SIZES['cuda']} and D in {FULL_DIMS['cuda']} on GPU "
                        f"(N in {FULL_SIZES['cpu']}, D in {FULL_DIMS['cpu']} on CPU)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out-dir", default=DEFAULT_OUT,
                   help="where the CSV, markdown and PNG go (new files named by device, date and time)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per cell before it is given up")
    p.add_argument("--workers", choices=["per-backend", "per-cell"], default="per-backend",
                   help="per-backend (default): one worker process per backend serves all its cells; per-cell: "
                        "fresh worker processes for every cell (slow: torch starts, and compiles, per cell)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in each worker (default: torch's)")
    args = p.parse_args(argv)
    if args.quick and args.full:
        p.error("--quick and --full exclude each other")
    for name in ("sizes", "dims"):
        if any(v < 2 for v in getattr(args, name) or []):
            p.error(f"--{name} values must be >= 2")
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.timeout <= 0:
        p.error("--timeout must be > 0")
    return args


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    return torch.device(choice)


def backends_to_run(device: torch.device, wanted: Optional[List[str]], losses=tuple(LOSSES)):
    """(names to run, in ``LEAD_ORDER`` then the fused backends; {name: reason} for those left out). A competitor
    runs when it can run one of ``losses`` (``plan`` gives it the cells of those only)."""
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
        reasons = [competitors.unavailable_reason(name, device, loss) for loss in losses]
        if None in reasons:
            names.append(name)
        else:
            skipped[name] = reasons[0]
    if wanted:
        known = set(names) | set(skipped) | set(getattr(mk.backends, "_MODULES", ()))
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise SystemExit(f"--backends: unknown {unknown}; known: {names + sorted(skipped)}")
        for w in wanted:
            if w in skipped:
                print(f"note: backend {w!r} is not available here: {skipped[w]}", file=sys.stderr)
        names = [n for n in names if n in wanted]
    lead = {b: i for i, b in enumerate(LEAD_ORDER)}
    return sorted(names, key=lambda b: lead.get(b, len(lead))), skipped


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


def plan(args, device: torch.device, backends: List[str]) -> List[dict]:
    """The cells in table order: by dtype, D, loss and N; at each N the GEMM rate first (once per dtype, N, D),
    then the backends. ``group`` is the loss whose lines a cell prints among (a GEMM cell's is the first loss)."""
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES if args.full else SIZES)[device.type]
    dims = args.dims or (FULL_DIMS if args.full else DIMS)[device.type]
    dtypes = args.dtypes or (["float32", "bfloat16"] if device.type == "cuda" else ["float32"])
    cells = []
    for dtype in dtypes:
        for D in dims:
            for loss_index, loss in enumerate(args.losses):
                for N in sorted(set(sizes)):
                    base = dict(dtype=dtype, N=N, D=D, device=str(device), repeats=args.repeats,
                                threads=args.threads, group=loss)
                    if loss_index == 0 and not args.no_gemm:
                        cells.append(dict(base, backend=report.GEMM, loss="none"))
                    cells += [dict(base, backend=b, loss=loss) for b in backends
                              if b not in competitors.COMPETITORS
                              or competitors.unavailable_reason(b, device, loss) is None]
    for i, spec in enumerate(cells):
        spec["index"] = i
    return cells


# ---------------------------------------------------------------------------------------------------------------
# Worker processes (the parent's side of ``bench.worker``'s protocol)

class Interrupted(Exception):
    """Ctrl-C: stop the sweep and keep what finished."""


class WorkerFailed(Exception):
    """A worker died, or said nothing for too long; the message is the note its cell gets."""


class Worker:
    """One ``python -m bench.worker`` process, in its own session (Ctrl-C reaches only the parent, which then ends
    it), with its stdout and stderr drained by threads so that a chatty compiler never stalls it."""

    def __init__(self, env_extra: Dict[str, str]):
        env = dict(os.environ, **env_extra)
        env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.worker"], cwd=REPO_ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1, start_new_session=True)
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self.err_tail: List[str] = []
        threading.Thread(target=self._drain_stdout, daemon=True).start()
        threading.Thread(target=self._drain_stderr, daemon=True).start()

    def _drain_stdout(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            self.err_tail[:] = (self.err_tail + [line.rstrip()])[-20:]

    def wait_ready(self, timeout: float, stop: threading.Event) -> None:
        self._next(READY_PREFIX, timeout, stop, "starting")

    def ask(self, spec: dict, timeout: float, stop: threading.Event) -> dict:
        try:
            self.proc.stdin.write(json.dumps(spec) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise WorkerFailed(self._death_note()) from None
        return json.loads(self._next(CELL_PREFIX, timeout, stop, "measuring"))

    def _next(self, prefix: str, timeout: float, stop: threading.Event, doing: str) -> str:
        """The payload of the next line that starts with ``prefix`` (other output is ignored), polling ``stop``."""
        deadline = time.monotonic() + timeout
        while True:
            if stop.is_set():
                raise Interrupted()
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerFailed(f"timed out after {timeout:.0f} s ({doing})")
            try:
                line = self.lines.get(timeout=min(0.2, left))
            except queue.Empty:
                continue
            if line is None:
                raise WorkerFailed(self._death_note())
            if line.startswith(prefix + " "):
                return line[len(prefix) + 1:]

    def _death_note(self) -> str:
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        time.sleep(0.05)  # let the stderr thread take the last lines
        tail = next((l for l in reversed(self.err_tail) if l.strip()), "no output")
        return f"worker exited with code {code}: {tail}"[:300]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except (OSError, ValueError):
                pass


class WorkerPool:
    """Workers by name: one per backend (the GEMM runs in the reference's) and, on the CPU, ``MEMORY_WORKER`` for
    every peak-memory measurement. ``fresh``: a new worker for every request (``--workers per-cell``)."""

    def __init__(self, stop: threading.Event, fresh: bool = False):
        self.stop, self.fresh = stop, fresh
        self.workers: Dict[str, Worker] = {}
        self.failed_start: Dict[str, str] = {}

    @staticmethod
    def name_for(spec: dict, measure: str) -> str:
        if measure == "memory":
            return MEMORY_WORKER
        return "torch" if spec["backend"] == report.GEMM else spec["backend"]

    def start(self, names) -> None:
        """Start the workers ``names`` (those not running) side by side and wait until each is ready (their
        start-up overlaps)."""
        new = [name for name in dict.fromkeys(names) if name not in self.workers]
        for name in new:
            self.workers[name] = Worker(MALLOC_ENV if name == MEMORY_WORKER else {})
        for name in new:
            try:
                self.workers[name].wait_ready(STARTUP_TIMEOUT_S, self.stop)
            except WorkerFailed as exc:
                self.workers.pop(name).kill()
                self.failed_start[name] = str(exc)

    def ask(self, name: str, spec: dict, timeout: float) -> dict:
        """The worker's result for ``spec``; a failure becomes a result with a note (Ctrl-C raises Interrupted)."""
        try:
            if name not in self.workers:
                self.start([name])
                if name not in self.workers:
                    return {"rows": [], "note": self.failed_start.pop(name)}
            return self.workers[name].ask(spec, timeout, self.stop)
        except WorkerFailed as exc:
            self.workers.pop(name).kill()
            return {"rows": [], "note": str(exc)}
        finally:
            if self.fresh and name in self.workers:
                self.workers.pop(name).kill()

    def close(self) -> None:
        for worker in self.workers.values():
            worker.kill()
        self.workers.clear()


def measure_cell(pool: WorkerPool, spec: dict, timeout: float) -> dict:
    """One cell's result. On the CPU the memory worker measures the peak memory first, then the backend's worker
    the times (a cell that failed in the first is not run again); on CUDA the backend's worker does both."""
    if not spec["device"].startswith("cpu"):
        return pool.ask(pool.name_for(spec, "both"), dict(spec, measure="both"), timeout)
    memory = pool.ask(MEMORY_WORKER, dict(spec, measure="memory"), timeout)
    if not memory["rows"]:
        return memory
    timing = pool.ask(pool.name_for(spec, "time"), dict(spec, measure="time"), timeout)
    if not timing["rows"]:  # failed (a hang, a crash): the cell failed, whatever its memory was
        return timing
    by_pass = {row["pass"]: row for row in timing["rows"]}
    for row in memory["rows"]:
        timed = by_pass.get(row["pass"], {})
        for field in ("ms", "ms_q1", "ms_q3", "repeats"):
            row[field] = timed.get(field)
        row["note"] = "; ".join(n for n in (row["note"], timed.get("note", "")) if n)
    note = "; ".join(n for n in (memory["note"], timing["note"]) if n)
    return {"rows": memory["rows"], "note": note, "pid": timing.get("pid"), "memory_pid": memory.get("pid")}


def run_cells(cells: List[dict], pool: WorkerPool, timeout: float, on_result, on_start=None) -> None:
    """Measure ``cells`` in order, one at a time, calling ``on_start(spec)`` before and ``on_result(spec, result)``
    after each; the ``SkipRules`` settle cells that need not run. Raises Interrupted on Ctrl-C (``pool.stop``)."""
    rules = SkipRules()
    for spec in cells:
        if pool.stop.is_set():
            raise Interrupted()
        if on_start is not None:
            on_start(spec)
        note = rules.note_for(spec)
        result = {"rows": [], "note": note} if note else measure_cell(pool, spec, timeout)
        rules.record(spec, result)
        on_result(spec, result)


# ---------------------------------------------------------------------------------------------------------------
# Results: rows as cells finish, to the terminal and to the files

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


class Sweep:
    """The rows so far, their files and the lines printed as cells finish. The CSV grows a cell at a time; the
    markdown is rewritten after each cell (atomically), so both always hold every finished cell."""

    def __init__(self, stem: str, meta: Dict[str, str], device_label: str, total: int, write):
        self.stem, self.meta, self.label, self.total, self.write = stem, meta, device_label, total, write
        self.rows: List[dict] = []
        self.done = 0
        self.group = None
        report.start_csv(stem + ".csv")
        self._write_markdown("running", create=True)

    def add(self, spec: dict, result: dict) -> None:
        new = result_rows(spec, result, self.label)
        self.rows += new
        self.done += 1
        report.append_csv(new, self.stem + ".csv")
        self._write_markdown("running")
        group = (spec["group"], spec["dtype"], spec["D"])
        if group != self.group:
            self.group = group
            self.write(report.group_title(*group))
        for line in report.cell_lines(self.rows, spec["backend"], spec["loss"], spec["dtype"], spec["N"],
                                      spec["D"]):
            self.write(line)

    def finish(self, status: str) -> None:
        self._write_markdown(status)

    def _write_markdown(self, status: str, create: bool = False) -> None:
        meta = dict(self.meta, **{
            "status": f"{status}: {self.done} of {self.total} cells measured",
            "wall time": f"{time.perf_counter() - STARTED:.0f} s from the start of the command",
            "load average at the end (1, 5, 15 min)": _load(),
        })
        text = report.markdown(self.rows, meta)
        if create:
            with open(self.stem + ".md", "x") as f:  # "x": never overwrite an earlier run's file
                f.write(text)
            return
        tmp = self.stem + ".md.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.stem + ".md")


def _load() -> str:
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg()) + f" on {os.cpu_count()} CPUs"
    except OSError:
        return "unknown"


def _busy_warning() -> Optional[str]:
    """A warning when other work already loads the CPUs: the times would measure the contention as much as the
    backends (the spread column and the NOISY flags show it)."""
    try:
        load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    except OSError:
        return None
    if load < 0.5 * cpus:
        return None
    return textwrap.fill(f"note: the load average is {load:.1f} on {cpus} CPUs before the run: other processes "
                         "compete for the cores, so the times will be slower and noisier than on a quiet machine",
                         report.WIDTH)


def _sigint_sets(stop: threading.Event):
    """A SIGINT handler: the first Ctrl-C asks the sweep to stop at its next poll (at most 0.2 s: the worker
    measuring is ended, what finished is kept); a second one stops at once."""
    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    return handler


def run_metadata(args, argv, label: str, device: torch.device, now: datetime.datetime, backends: List[str],
                 skipped: Dict[str, str]) -> Dict[str, str]:
    """How the run was made, for the markdown (the status, wall time and end load are added as it goes)."""
    command = sys.argv[1:] if argv is None else argv
    return {
        "command": ("python -m bench " + " ".join(shlex.quote(a) for a in command)).rstrip(),
        "date": now.isoformat(timespec="minutes"), "device": f"{label} ({device.type})", "torch": torch.__version__,
        "python": platform.python_version(), "threads": str(args.threads or torch.get_num_threads()),
        "load average at the start (1, 5, 15 min)": _load(),
        "losses": "; ".join(f"{name}: {LOSSES[name].summary}" for name in args.losses),
        "backends run": ", ".join(backends),
        "workers": ("one process per backend" if args.workers == "per-backend" else "fresh processes for every cell")
                   + ("; peak memory in a separate process with glibc's mmap threshold at 256 KiB"
                      if device.type == "cpu" else ""),
        "not run": "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "—",
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    label = report.device_name(device)
    now = datetime.datetime.now()
    backends, skipped = backends_to_run(device, args.backends, args.losses)
    cells = plan(args, device, backends)
    print(textwrap.fill(f"device: {label} ({device.type}); torch {torch.__version__}; backends: "
                        f"{', '.join(backends)}; {len(cells)} cells", report.WIDTH))
    for name, why in skipped.items():
        print(textwrap.fill(f"not run: {name} ({why})", report.WIDTH, initial_indent="  ", subsequent_indent="    "))
    busy = _busy_warning()
    if busy:
        print(busy)

    stem = report.new_stem(args.out_dir, report.file_stem(label, now.strftime("%Y-%m-%d-%H%M")),
                           (".csv", ".md", ".png", ".md.tmp"))
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, _sigint_sets(stop))
    pool = WorkerPool(stop, fresh=args.workers == "per-cell")
    bar = progress(len(cells), "bench", enabled=not args.no_progress)
    sweep = Sweep(stem, run_metadata(args, argv, label, device, now, backends, skipped), label, len(cells),
                  bar.write)
    bar.write(report.table_header())

    def on_result(spec, result):
        sweep.add(spec, result)
        bar.update()

    def on_start(spec):
        bar.set_postfix_str(f"{spec['backend']} {spec['group']} {spec['dtype']} N={spec['N']} D={spec['D']}")

    status = "complete"
    try:
        if not pool.fresh:  # start every worker now, side by side, instead of one by one as cells need them
            first = [MEMORY_WORKER] if device.type == "cpu" else []
            pool.start(first + [pool.name_for(c, "time") for c in cells])
        run_cells(cells, pool, args.timeout, on_result, on_start)
    except (Interrupted, KeyboardInterrupt):
        status = "interrupted (Ctrl-C)"
    finally:
        pool.close()
        bar.close()
        signal.signal(signal.SIGINT, previous)
        sweep.finish(status)
    print(f"\n{status}: {sweep.done} of {len(cells)} cells, {time.perf_counter() - STARTED:.0f} s; "
          f"load average {_load()}")
    print(report.format_table(sweep.rows))
    print(report.LEGEND)
    _write_plot_and_list(args, sweep, label, now)
    return 130 if status != "complete" else 0


def _write_plot_and_list(args, sweep: Sweep, label: str, now: datetime.datetime) -> None:
    written = [sweep.stem + ".csv", sweep.stem + ".md"]
    if not args.no_plot and sweep.rows:
        why = report.plot(sweep.rows, sweep.stem + ".png", title=f"{label} — {now.date().isoformat()}")
        if why:
            print(f"plot skipped: {why}")
        else:
            written.append(sweep.stem + ".png")
    print("wrote:" + "".join(f"\n  {path}" for path in written))
    failed = [r for r in sweep.rows if not math.isfinite(r["ms_median"])]
    if failed:
        print(f"{len(failed)} of {len(sweep.rows)} measurements have no value; see the notes")


if __name__ == "__main__":
    sys.exit(main())
