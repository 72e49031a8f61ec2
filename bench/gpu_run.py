"""`bash bench/gpu_run.sh OUTDIR`: everything a GPU session measures, in one process and one call of at most
9 minutes on an H200, most important first (the same as ``PYTHONPATH=. python3 -m bench.gpu_run --out OUTDIR``).

    header       the GPU, torch / triton / CUDA versions
    headline     bf16, N = M = 16384, D = 512, symmetric InfoNCE with per-sample τ: forward, backward and
                 forward+backward time and peak extra memory of the backend under test (triton), openclip,
                 openclip_compile and the torch backend, and the bare GEMM, with the goals of issue 11
    profile      one forward+backward under torch.profiler: the top kernels by CUDA time
    sweep        tile configurations of the headline cell (``mmts_kernels.triton_backend.op.Config`` fields, the
                 syntax of MMTS_KERNELS_TRITON_CONFIG), as a fraction of this run's GEMM rate
    correctness  ``bench.gpu_check``'s quick cases against the float64 reference (loss and every gradient), issue
                 18's sigmoid and label modes last
    goals        the other speed rows, each with its goal and PASS / FAIL: fp32 "highest" and "high",
                 N = 65536, max-margin, hardest negative, DySTreSS, deterministic, D = 256 and 1024, and last the
                 fused sigmoid loss against the materialized one (open_clip's formula, eager and compiled)
    tests        the GPU test files under pytest (log beside the results), if time remains

Every row goes to ``OUTDIR/gpu-run-<GPU>-<date>-<time>.csv`` and ``.md`` (and the markdown to stdout) the moment it
is measured, so a run cut short keeps what it measured. ``--budget`` seconds (default 520, counted from the
start of ``main``) bound the run: an item that would not fit in its section's share of the budget is skipped
with a note, and a failing item becomes a row saying why while the run goes on. Compiled graphs are kept for the
whole run (no ``torch._dynamo.reset()`` between rows). Without CUDA every cell is tiny (N / 256, D / 16) and
runs the cpp or torch backend, or triton under TRITON_INTERPRET=1: the CI smoke test of this command.
Exit status 1 when a correctness case or the test run fails; the speed goals are reported, not enforced.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from typing import Callable, List

import torch

import mmts_kernels as mk

from . import gpu_check as check
from . import report
from .gpu_check import Row
from .worker import describe, measure_passes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAD = Row(check.HEADLINE, "bfloat16", 16384, 512, competitors=("openclip", "openclip_compile", "torch", "inf_cl"))
GOAL_ROWS = (
    Row("fp32/highest", "float32", 16384, 512, precision="highest", competitors=("openclip", "torch")),
    Row("fp32/high", "float32", 16384, 512, precision="high", competitors=("openclip", "torch")),
    Row("bf16 N=65536", "bfloat16", 65536, 512, competitors=()),
    *(Row(f"bf16 {m}", "bfloat16", 16384, 512, mode=m, competitors=(), gemm=False)
      for m in ("max_margin", "max_margin_hardest", "dystress", "deterministic")),
    Row("bf16 D=256", "bfloat16", 16384, 256, competitors=HEAD.competitors),
    Row("bf16 D=1024", "bfloat16", 16384, 1024, competitors=HEAD.competitors),
    # issue 18: the fused sigmoid (SigLIP) loss, per-sample τ, bias −10; "openclip": the materialized formula
    Row("bf16 sigmoid", "bfloat16", 16384, 512, mode="sigmoid", competitors=("openclip", "openclip_compile", "torch"),
        gemm=False),
)
# Tile configurations over the GPU default (block_n=128, block_m=64, block_d=64, num_warps=8, num_stages=3), most
# promising first. None spills at sm_90 (python_tests/triton_sm90.py's compile, bf16 InfoNCE, 2026-11-30) except
# 128×64 with 4 warps, kept on purpose (issue 20): its forward does not spill, its backward's ds_kernel spills 184
# bytes. Left out for spilling: 128×128 and 256×64 tiles, 64×128 with 4 warps (ds_kernel: 408 bytes).
SWEEP = (
    "",
    "block_n=64,block_m=128,num_warps=8",
    "block_d=128,num_stages=2",
    "num_stages=4",
    "num_warps=4",
    "block_n=64,block_m=64,num_warps=4,num_stages=4",
    "block_d=32,num_stages=4",
    "bwd_panel_factor=2",
)
GPU_TESTS = ("python_tests/test_triton.py", "python_tests/test_backend_contract.py", "python_tests/test_validation.py")
# Each section's items must end by this fraction of the budget, so a slow section cannot starve the later ones.
UNTIL = {"headline": 1.0, "profile": 0.35, "sweep": 0.42, "correctness": 0.62, "goals": 0.93, "tests": 1.0}
# Seconds an item needs at full size to be worth starting (compiles included); tiny cells: no minimum.
NEEDS = {"headline": 0, "profile": 10, "sweep": 15, "correctness": 8, "goals": 15, "compiled": 60, "tests": 60}


class Recorder:
    """The run's CSV and markdown, each line written and flushed the moment it is known; markdown is echoed to
    stdout."""

    def __init__(self, out_dir: str, label: str, now: datetime.datetime):
        safe = report.file_stem(f"gpu-run-{label}", now.strftime("%Y-%m-%d-%H%M")).replace("+", "-")
        stem = report.new_stem(out_dir, safe, (".csv", ".md"))  # letters, digits, '.', '-': the device tool's rule
        self.stem = stem
        self.rows: List[dict] = []
        self._csv = open(stem + ".csv", "x", newline="")
        self._writer = csv.writer(self._csv)
        self._writer.writerow(check.CSV_FIELDS)
        self._md = open(stem + ".md", "x")
        self._csv.flush()

    def add(self, rows: List[dict]) -> None:
        for r in rows:
            self._writer.writerow([check.csv_cell(r.get(k, "")) for k in check.CSV_FIELDS])
            self.rows.append(r)
        self._csv.flush()

    def md(self, *lines: str) -> None:
        for line in lines:
            self._md.write(line + "\n")
            print(line, flush=True)
        self._md.flush()

    def table(self, title: str, intro: str, header: List[str]) -> None:
        self.md("", f"## {title}", "", intro, "", "| " + " | ".join(header) + " |",
                "|" + "|".join("---" for _ in header) + "|")

    def close(self) -> None:
        self._csv.close()
        self._md.close()


class Run:
    """The budget clock, the backend under test and the rows so far."""

    def __init__(self, args, device: torch.device, backend: str, rec: Recorder):
        self.args, self.device, self.backend, self.rec = args, device, backend, rec
        self.tiny = args.tiny or device.type != "cuda"
        self.start = time.perf_counter()
        self.head: List[dict] = []
        self.skipped: List[str] = []
        self.test_status = ""

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self, section: str) -> float:
        return UNTIL[section] * self.args.budget - self.elapsed()

    def log(self, text: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {text}", flush=True)

    def attempt(self, section: str, name: str, needs: str, fn: Callable[[], None], base: dict) -> None:
        """``fn()`` when it fits in the section's share of the budget, else a skipped row; an exception becomes a
        failed row and the run goes on."""
        needed = 0 if self.tiny else NEEDS[needs]
        left = self.left(section)
        if left <= needed:
            note = f"skipped: time budget ({max(left, 0):.0f} s left of the {section} share, needs ~{needed} s)"
            self.skipped.append(f"{section}: {name}")
            self.rec.add([dict(base, section=section, name=name, method=self.backend, metric="skipped",
                               value=math.nan, note=note)])
            self.rec.md(f"| {name} | {note} |")
            return
        self.log(f"{section}: {name}")
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 — a failing item is recorded, the next one runs
            note = describe(exc)
            self.rec.add([dict(base, section=section, name=name, method=self.backend, metric="failed",
                               value=math.nan, status="FAIL", note=note)])
            self.rec.md(f"| {name} | failed: {note} |")
        check.free_memory(self.device)

    def sized(self, row: Row) -> Row:
        return replace(row, N=row.N // 256, D=row.D // 16) if self.tiny else row


# ---------------------------------------------------------------------------------------------------------------
# Sections

def header(run: Run, argv: List[str]) -> None:
    dev = run.device
    info = {"command": "python -m bench.gpu_run " + shlex.join(argv),
            "date": datetime.datetime.now().isoformat(" ", "minutes"), "device": report.device_name(dev),
            "backend": run.backend,
            "versions": f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {check.triton_version()}, "
                        f"python {platform.python_version()}",
            "budget": f"{run.args.budget:.0f} s", "sizes": "tiny (no CUDA): N / 256, D / 16" if run.tiny else "full"}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info["gpu"] = (f"{p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, "
                       f"sm_{p.major}{p.minor}")
    run.rec.md(f"# GPU run: {info['device']}, {info['date']}", "", *(f"- **{k}**: {v}" for k, v in info.items()))
    run.rec.add([dict(section="env", name=k, note=v) for k, v in info.items()])


def speed_row(run: Run, section: str, row: Row) -> None:
    """Time one speed row (``gpu_check.time_row``) and append it with its goals."""
    row = run.sized(row)

    def measure():
        got = check.time_row(row, run.backend, run.device, run.args.repeats, set(run.args.competitors))
        if row.key == HEAD.key:
            run.head = got
        goals = check.row_goals(got, run.head, run.backend)
        run.rec.add(got + goals)
        cells = check.speed_table(got, run.backend)[1][0]
        verdicts = "; ".join(f"{g['metric']}: {g['note']} **{g['status']}**" for g in goals)
        notes = "; ".join(dict.fromkeys(f"{r['method']}: {r['note']}" for r in got if r.get("note")))
        run.rec.md("| " + " | ".join(cells + [verdicts, notes]) + " |")

    compiles = "openclip_compile" in row.competitors and "openclip_compile" in run.args.competitors
    needs = "compiled" if compiles else section
    run.attempt(section, row.key, needs, measure, _base(row))


def speed_header(run: Run, title: str) -> None:
    cols = check.speed_header(run.backend) + ["goals (issue 11)", "notes"]
    run.rec.table(title, "`triton.testing.do_bench` medians in this process (CPU: median of the repeats); fwd+bwd "
                  "at 8·N·M·D FLOPs; peak extra MiB: memory a fwd+bwd adds over its inputs; competitors: fwd+bwd "
                  "ms; goals judged on this run's numbers.", cols)


def profile(run: Run) -> None:
    row = run.sized(HEAD)
    run.rec.table("Kernels of one forward+backward", f"torch.profiler, {row.key} N={row.N} D={row.D}, backend "
                  f"{run.backend}: self time per kernel ({'CUDA' if run.device.type == 'cuda' else 'CPU ops'}).",
                  ["kernel", "calls", "self ms", "share"])

    def measure():
        x, y, tau, _ = check.make_inputs(row.N, row.N, row.D, check.DTYPES[row.dtype], run.device, "infonce")
        x.requires_grad_()
        y.requires_grad_()
        rows = kernel_breakdown(lambda: mk.info_nce(x, y, tau, backend=run.backend).backward(), run.device,
                                run.args.top_kernels)
        run.rec.add([dict(_base(row), section="profile", name=r["name"], method=run.backend, metric="self_ms",
                          value=r["ms"], note=f"{r['calls']} calls, {r['share']:.1%}") for r in rows])
        run.rec.md(*(f"| `{r['name'][:90]}` | {r['calls']} | {r['ms']:.3f} | {r['share']:.1%} |" for r in rows))

    run.attempt("profile", "profile", "profile", measure, _base(row))


def kernel_breakdown(fn: Callable[[], None], device: torch.device, top: int) -> List[dict]:
    """The ``top`` kernels of one ``fn()`` by self time (CUDA kernels on a GPU, CPU ops otherwise), after a warm-up
    call so compilation is not profiled; share: of all kernels' self time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device.type == "cuda"
    fn()
    _sync(device)
    with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        _sync(device)
    events = prof.key_averages()
    if cuda:  # kernels only: a CPU op's device time repeats its kernels' (unless the profiler lists no kernel)
        events = [e for e in events if e.device_type == DeviceType.CUDA] or list(events)
        self_us = [getattr(e, "self_device_time_total", None) or e.self_cuda_time_total for e in events]
    else:
        self_us = [e.self_cpu_time_total for e in events]
    total = sum(self_us) or math.nan
    ranked = sorted(zip(events, self_us), key=lambda p: -p[1])[:top]
    return [dict(name=e.key, calls=e.count, ms=us / 1e3, share=us / total) for e, us in ranked if us > 0]


def sweep(run: Run) -> None:
    row = run.sized(HEAD)
    gemm_ms = next((r["value"] for r in run.head if r["method"] == "gemm"), math.nan)
    gemm_rate = report.tflops("gemm", "forward", row.N, row.N, row.D, gemm_ms)
    run.rec.table("Tile configurations", f"{row.key} N={row.N} D={row.D}, backend triton; fields of "
                  "`mmts_kernels.triton_backend.op.Config` over the default (MMTS_KERNELS_TRITON_CONFIG syntax); "
                  "of GEMM: against the headline's GEMM rate.",
                  ["configuration", "fwd ms", "bwd ms", "fwd+bwd ms", "TFLOP/s", "of GEMM", "speed-up vs default",
                   "peak extra MiB", "note"])
    if run.backend != "triton":
        run.rec.md(f"| (none) | the sweep tunes the triton backend; this run tests {run.backend} |")
        return
    from mmts_kernels.triton_backend import op

    base_cfg = op.GPU_CONFIG if run.device.type == "cuda" else op.INTERPRETER_CONFIG
    x, y, tau, _ = check.make_inputs(row.N, row.N, row.D, check.DTYPES[row.dtype], run.device, "infonce")
    x.requires_grad_()
    y.requires_grad_()
    default_ms = []

    def measure(spec):
        with op.tile_config(op._parse_config(spec, base_cfg)):
            res = measure_passes(lambda: mk.info_nce(x, y, tau, backend="triton"), (x, y), run.device,
                                 run.args.repeats)
        by = {r["pass"]: r for r in res["rows"]}
        ms = {p: _num(by.get(p, {}).get("ms")) for p in ("forward", "backward", "full")}
        mib = _num(by.get("full", {}).get("mem")) / 2**20
        if not spec:
            default_ms.append(ms["full"])
        note = "; ".join(filter(None, [res["note"]] + [r.get("note", "") for r in res["rows"]]))
        name = spec or "(default)"
        run.rec.add([dict(_base(row), section="sweep", name=name, method="triton", metric=m, value=v, note=note)
                     for m, v in (("fwd_ms", ms["forward"]), ("bwd_ms", ms["backward"]), ("full_ms", ms["full"]),
                                  ("peak_extra_mib", mib))])
        rate = report.tflops("torch", "full", row.N, row.N, row.D, ms["full"])
        speedup = report.ratio(default_ms[0] if default_ms else math.nan, ms["full"])
        cells = [report.fmt(ms["forward"], ".3f"), report.fmt(ms["backward"], ".3f"), report.fmt(ms["full"], ".3f"),
                 report.fmt(rate, ".3g"), report.fmt(report.ratio(rate, gemm_rate), ".0%"),
                 report.fmt(speedup, ".2f", "×"), report.fmt(mib, ".1f"), note]
        run.rec.md("| " + " | ".join([name] + cells) + " |")

    for spec in run.args.sweep:
        run.attempt("sweep", spec or "(default)", "sweep", lambda: measure(spec), _base(row))


def correctness(run: Run) -> None:
    cases = check.config(run.device, quick=not run.args.full_correctness, tiny=run.tiny)
    run.rec.table("Correctness against the float64 reference", "‖out − ref‖/‖ref‖ of the loss and each gradient; "
                  "the reference is the torch backend in float64 on the same rounded inputs (N·M ≥ 2³¹ on a GPU: a "
                  "chunked float64 computation of the loss value).",
                  ["case", "quantity", "rel. error", "bar", "status", "note"])
    for case in cases.cases:
        def verify(case=case):
            got = check.check_case(case, run.backend, run.device, cases.chunk_elems)
            run.rec.add(got)
            run.rec.md(*(f"| {r['name']} | {r['metric']} | {report.fmt(r['value'], '.2e')} | "
                         f"{report.fmt(r['bar'], '.0e')} | {r['status']} | {r.get('note', '')} |" for r in got))

        run.attempt("correctness", case.label, "correctness", verify,
                    dict(dtype=case.dtype, precision=case.precision or "", N=case.N, M=case.M, D=case.D,
                         mode=case.mode))


def tests(run: Run) -> None:
    """The GPU test files under pytest in a subprocess, bounded by the budget left; the log beside the results."""
    run.rec.table("GPU tests", f"`pytest {' '.join(GPU_TESTS)}` (cpp backend off), log: "
                  f"`{os.path.basename(run.rec.stem)}-pytest.log`.", ["tests", "result"])
    if run.device.type != "cuda":
        run.rec.md(f"| {' '.join(GPU_TESTS)} | not run: no CUDA device (CI runs the suite on the CPU) |")
        return

    def run_pytest():
        cmd = [sys.executable, "-m", "pytest", *GPU_TESTS, "-q", "-rfE", "-p", "no:cacheprovider"]
        env = dict(os.environ, MMTS_KERNELS_DISABLE_CPP="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
        log_path = run.rec.stem + "-pytest.log"
        with open(log_path, "w") as log:
            try:
                rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=max(1.0, run.left("tests"))).returncode
            except subprocess.TimeoutExpired:
                rc = None
        with open(log_path) as log:
            last = ([line.strip() for line in log if line.strip()] or ["(no output)"])[-1]
        status = "TIMEOUT" if rc is None else ("PASS" if rc == 0 else "FAIL")
        run.test_status = status
        run.rec.add([dict(section="tests", name=" ".join(GPU_TESTS), method="pytest", metric="exit status",
                          value=math.nan if rc is None else rc, status=status, note=last)])
        run.rec.md(f"| {' '.join(GPU_TESTS)} | **{status}**: {last} |")

    run.attempt("tests", "pytest", "tests", run_pytest, {})


def summary(run: Run) -> int:
    rows = run.rec.rows
    goals = [r for r in rows if r["section"] == "goal"]
    failed = [r for r in rows if r["section"] == "correctness" and r.get("status") == "FAIL"]
    count = {s: sum(g["status"] == s for g in goals) for s in ("PASS", "FAIL", "n/a")}
    run.rec.md("", "## Summary", "",
               f"- goals: {count['PASS']} PASS, {count['FAIL']} FAIL, {count['n/a']} n/a",
               f"- correctness: {'all PASS' if not failed else f'{len(failed)} FAIL'} "
               f"({sum(r['section'] == 'correctness' and r['metric'] != 'skipped' for r in rows)} rows)",
               f"- skipped over the time budget: {', '.join(run.skipped) if run.skipped else 'nothing'}",
               f"- wall time: {run.elapsed():.0f} s of a {run.args.budget:.0f} s budget")
    if run.test_status:
        run.rec.md(f"- GPU tests: {run.test_status}")
    return 1 if failed or run.test_status in ("FAIL", "TIMEOUT") else 0


def _base(row: Row) -> dict:
    return dict(dtype=row.dtype, precision=row.precision or "", N=row.N, M=row.N, D=row.D, mode=row.mode)


def _num(v) -> float:
    return math.nan if v is None else float(v)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------------
# The command

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder of the CSV, markdown and pytest log (created if needed)")
    p.add_argument("--budget", type=float, default=520.0, help="seconds for the whole run (default: 520)")
    p.add_argument("--backend", help="the backend under test (default: triton on CUDA; cpp, else torch, on CPU)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--tiny", action="store_true", help="tiny cells on any device (always so without CUDA)")
    p.add_argument("--competitors", nargs="*", default=list(HEAD.competitors), choices=check.TIMING_COMPETITORS,
                   help="what to time next to the backend (default: all that run here)")
    p.add_argument("--sweep", nargs="*", default=list(SWEEP), help="tile configurations ('' is the default)")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--full-correctness", action="store_true",
                   help="all 44 correctness cases on a GPU (more dtypes and modes) instead of the quick 21")
    p.add_argument("--top-kernels", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats on a CPU (a GPU: do_bench decides)")
    return p.parse_args(argv)


SECTIONS = {
    "headline": lambda run: (speed_header(run, "Headline"), speed_row(run, "headline", HEAD)),
    "profile": profile,
    "sweep": sweep,
    "correctness": correctness,
    "goals": lambda run: (speed_header(run, "Goal rows"), [speed_row(run, "goals", r) for r in GOAL_ROWS]),
    "tests": tests,
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    backend = check.pick_backend(args.backend, device)
    check.allow_recompiles()
    rec = Recorder(args.out, report.device_name(device), datetime.datetime.now())
    run = Run(args, device, backend, rec)
    try:
        header(run, argv)
        reason = mk.backends.unavailable_reason(backend, device)
        if reason:
            rec.md("", f"**backend {backend} cannot run on {device}: {reason}** (its rows record why)")
        for name in args.sections:
            SECTIONS[name](run)
        status = summary(run)
    finally:
        rec.close()
    print(f"wrote {rec.stem}.csv and {rec.stem}.md", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
