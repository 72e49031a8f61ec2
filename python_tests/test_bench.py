"""Smoke tests of the benchmark commands (`python -m bench`, `bench.cpp_vs_gemm`,
`bench.plot_schedule`) at tiny sizes, plus the pieces they rest on: the worker pool (one process per backend, a
hung or failed worker costing its cell only, Ctrl-C keeping what finished), the 120-column table, the loss registry,
the competitor losses, the chunked float64 reference, the CPU peak-memory probe, adaptive repeats, FLOP counting,
repeat spreads and file names that never overwrite.
The long-tail experiment (`python -m bench.longtail`) is tested in test_longtail.py."""
from __future__ import annotations

import csv
import functools
import math
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `bench` is not an installed package: import it from the checkout

import mmts_kernels as mk  # noqa: E402
from bench import competitors, cpp_vs_gemm, gpu_check, plot_schedule, report, worker  # noqa: E402
from bench.__main__ import WorkerPool, backends_to_run, parse_args, plan, result_rows, run_cells  # noqa: E402
from bench.timing import (PeakMemory, Timing, adaptive_enough, cpu_probe_reason, forward_backward_peaks,  # noqa: E402
                          measure_ms, time_forward_backward)

HEADER = "device,backend,loss,dtype,N,M,D,pass,ms_median,peak_mem_bytes,tflops,ms_q1,ms_q3,repeats"
CPP = pytest.mark.skipif(mk.backends.unavailable_reason("cpp", torch.device("cpu")) is not None,
                         reason=f"cpp backend: {mk.backends.unavailable_reason('cpp', torch.device('cpu'))}")
TINY = ["--sizes", "64", "--repeats", "1", "--no-plot", "--no-progress", "--losses", "infonce", "--threads", "1"]


def _env():
    return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _run(args, timeout=300, **env_extra):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=dict(_env(), **env_extra), capture_output=True,
                          text=True, timeout=timeout)


def _bench_csv(tmp_path, *extra):
    proc = _run(["-m", "bench", *TINY, "--out-dir", str(tmp_path), *extra])
    assert proc.returncode == 0, proc.stderr[-2000:]
    [csv_path] = [p for p in tmp_path.iterdir() if p.suffix == ".csv"]
    lines = csv_path.read_text().splitlines()
    assert lines[0] == HEADER
    return proc, csv_path, list(csv.DictReader(lines))


def _assert_measured(rows, backends):
    assert {(r["backend"], r["pass"]) for r in rows} == {("gemm", "forward")} | {
        (b, p) for b in backends for p in ("forward", "backward", "full")}
    for r in rows:
        assert (r["N"], r["M"], r["D"]) == ("64", "64", "256")
        assert math.isfinite(float(r["ms_median"])) and float(r["ms_median"]) > 0, r
        assert float(r["tflops"]) > 0
        assert float(r["ms_q1"]) <= float(r["ms_median"]) <= float(r["ms_q3"]) and r["repeats"] == "1"


def _assert_fits(text):
    too_wide = [line for line in text.splitlines() if len(line) > report.WIDTH]
    assert not too_wide, too_wide


def test_bench_torch_and_openclip_cells(tmp_path):
    proc, csv_path, rows = _bench_csv(tmp_path, "--backends", "torch", "openclip")
    _assert_measured(rows, ["torch", "openclip"])
    md = csv_path.with_suffix(".md").read_text()
    assert "openclip" in md and "command" in md and torch.__version__ in md
    assert "load average at the start" in md and "status**: complete: 3 of 3 cells" in md
    assert "## GEMM rate" in md and "ceiling" not in md.lower() and "spread" in md
    out = proc.stdout
    assert out.count(report.table_header()) == 2  # before the lines as they come, and above the whole table
    streamed = out[:out.index("complete: 3 of 3 cells")]
    assert "torch" in streamed and "openclip" in streamed and "── infonce, float32, D = 256" in streamed
    _assert_fits(out[:out.index("wrote:")])  # all but the file names


@CPP
def test_bench_cpp_and_torch_compile_cells(tmp_path):
    # one worker process per backend: torch.compile compiles once per cell, not once per measurement
    _, _, rows = _bench_csv(tmp_path, "--backends", "cpp", "torch_compile")
    _assert_measured(rows, ["cpp", "torch_compile"])


def test_bench_runs_never_overwrite(tmp_path):
    stems = [report.new_stem(str(tmp_path), "dev-2026-11-23-0500", (".csv", ".md")) for _ in range(2)]
    assert stems[0] == stems[1]  # nothing written yet
    open(stems[0] + ".md", "w").close()
    later = report.new_stem(str(tmp_path), "dev-2026-11-23-0500", (".csv", ".md"))
    assert later == stems[0] + "-2"
    report.write_csv([], later + ".csv")
    with pytest.raises(FileExistsError):
        report.write_csv([], later + ".csv")
    with pytest.raises(FileExistsError):
        report.start_csv(later + ".csv")


def test_ctrl_c_keeps_what_finished(tmp_path):
    """SIGINT to a running `python -m bench`, once its first line has printed: it stops, exits 130, prints the
    table of the cells that finished, and the CSV and markdown on disk hold exactly those cells. (2000 repeats
    make each cell last about a second, so the run is still going when the signal comes.)"""
    args = [sys.executable, "-m", "bench", "--backends", "torch", "openclip", "--sizes", "32", "48", "64", "80", "96",
            "--dims", "8", "--losses", "infonce", "max_margin", "--repeats", "2000", "--no-gemm", "--no-plot", "--no-progress", "--threads", "1",
            "--out-dir", str(tmp_path)]
    proc = subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stdout:  # lines come as cells finish: interrupt after the first one
            lines.append(line)
            if line.split()[:2] == ["32", "torch"]:
                break
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    out = "".join(lines) + rest
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted (Ctrl-C)" in out
    [csv_path] = list(tmp_path.glob("*.csv"))
    rows = list(csv.DictReader(csv_path.read_text().splitlines()))
    cells = {(r["backend"], r["loss"], r["N"]) for r in rows}
    assert ("torch", "infonce", "32") in cells and len(cells) < 2 * 2 * 5  # it stopped early
    assert len(rows) == 3 * len(cells)  # whole cells only, every pass of each
    assert all(math.isfinite(float(r["ms_median"])) for r in rows)
    md = csv_path.with_suffix(".md").read_text()
    assert f"interrupted (Ctrl-C): {len(cells)} of 20 cells measured" in md
    assert md.count("| infonce | float32 |") + md.count("| max_margin | float32 |") == len(cells)
    table = out[out.index("interrupted (Ctrl-C)"):]
    assert report.table_header() in table and "   32 torch" in table
    assert not list(tmp_path.glob("*.tmp"))


POOL_CELL = dict(dtype="float32", D=8, device="cpu", repeats=2, threads=1, loss="infonce", group="infonce")


def test_worker_pool_one_process_per_backend_and_skips_after_a_failure():
    """Cells of one backend run in one worker process, each backend in its own, the memory in a third; a backend
    whose cell fails is not tried again for that dtype; results arrive in order, with the spread of the repeats."""
    base = POOL_CELL
    specs = [dict(base, backend="torch", N=16), dict(base, backend="openclip", N=16), dict(base, backend="torch", N=32),
             dict(base, backend="no_such_backend", N=16), dict(base, backend="no_such_backend", N=32)]
    got = []
    pool = WorkerPool(threading.Event())
    try:
        run_cells(specs, pool, timeout=120, on_result=lambda spec, res: got.append((spec["backend"], spec["N"], res)))
    finally:
        pool.close()
    assert [(b, n) for b, n, _ in got] == [(s["backend"], s["N"]) for s in specs]
    torch16, openclip16, torch32 = (res for _, _, res in got[:3])
    assert torch16["pid"] == torch32["pid"] != openclip16["pid"]
    assert torch16["memory_pid"] == openclip16["memory_pid"] not in (torch16["pid"], openclip16["pid"])
    for res in (torch16, torch32):
        full = {r["pass"]: r for r in res["rows"]}["full"]
        assert full["ms"] > 0 and full["repeats"] == 2 and full["ms_q1"] <= full["ms"] <= full["ms_q3"]
        assert full["mem"] is not None
    assert got[3][2]["rows"] == [] and got[3][2]["note"]
    assert got[4][2]["note"].endswith("(at N=16)")  # not tried again


def test_worker_past_its_timeout_costs_its_cell_and_restarts():
    """A worker silent for longer than the timeout is killed; its cell gets the note, the next cell a fresh worker
    (each cell here needs well over 0.2 s: six fwd+bwd of the reference at N = 2048, so both time out, in order)."""
    base = dict(POOL_CELL, backend="torch", N=2048, D=256, repeats=5)
    got = []
    pool = WorkerPool(threading.Event())
    try:
        run_cells([dict(base, dtype="float32"), dict(base, dtype="float64")], pool, timeout=0.2,
                  on_result=lambda spec, res: got.append((spec["dtype"], res)))
    finally:
        pool.close()
    assert [(d, r["note"]) for d, r in got] == [("float32", "timed out after 0 s (measuring)"),
                                                ("float64", "timed out after 0 s (measuring)")]


def test_memory_worker_reads_each_cell_as_a_fresh_process_does():
    """The peak memory of a cell measured in the shared memory worker, after bigger cells of other backends, equals
    that of a fresh worker (every large buffer is its own mapping there, so nothing freed earlier is reused unseen)."""
    if cpu_probe_reason() is not None:
        pytest.skip(cpu_probe_reason())
    # big enough that the S-sized buffers dwarf what a process maps on its own schedule (thread stacks, arenas:
    # ~0.7 MiB either way at N = 384, which made the comparison flaky)
    cell = dict(POOL_CELL, D=64, backend="torch", N=1024, measure="memory")
    shared = WorkerPool(threading.Event())
    fresh = WorkerPool(threading.Event(), fresh=True)
    try:
        for earlier in (dict(cell, N=1280, backend="openclip"), dict(cell, N=1152)):
            shared.ask("memory", earlier, timeout=120)
        got = {name: {r["pass"]: r["mem"] for r in pool.ask("memory", cell, timeout=120)["rows"]}
               for name, pool in (("shared", shared), ("fresh", fresh))}
    finally:
        shared.close()
        fresh.close()
    assert got["fresh"]["full"] >= 1024 * 1024 * 4  # at least S
    for p in ("forward", "backward", "full"):
        assert abs(got["shared"][p] - got["fresh"][p]) <= max(0.1 * got["fresh"][p], 2**19), (p, got)


def test_a_new_loss_is_one_entry(monkeypatch):
    """A new loss row of the benchmark is one ``worker.LOSSES`` entry: the command line offers it, the plan
    measures it on every backend, the worker runs the library and the plain-PyTorch version."""
    def rows_only(x, y, tau, backend):
        return mk.info_nce(x, y, tau, backend=backend, symmetric=False, targets=torch.arange(x.shape[0]))

    def plain(x, y, tau):
        return competitors.openclip_infonce(x, y, tau, targets=torch.arange(x.shape[0]))

    entry = worker.BenchLoss(rows_only, plain, (0.05, 0.15), "one-directional InfoNCE")
    monkeypatch.setitem(worker.LOSSES, "infonce_rows", entry)
    args = parse_args(["--losses", "infonce_rows", "--sizes", "24", "--dims", "8", "--repeats", "1", "--no-gemm"])
    cells = plan(args, torch.device("cpu"), ["torch", "openclip"])
    assert [(c["backend"], c["loss"]) for c in cells] == [("torch", "infonce_rows"), ("openclip", "infonce_rows")]
    rows = []
    for spec in cells:
        rows += result_rows(spec, worker.measure_cell(dict(spec, measure="both")), "cpu")
    assert all(math.isfinite(r["ms_median"]) and r["peak_mem_bytes"] >= 0 for r in rows)
    x, y, tau = worker.make_inputs(24, 8, torch.float64, torch.device("cpu"), "infonce_rows")
    assert entry.library(x, y, tau, "torch").item() == pytest.approx(entry.plain(x, y, tau).item(), rel=1e-12)
    assert "infonce_rows" in report.format_table(rows)


def test_table_fits_120_columns():
    """Whatever the numbers, names and notes, no line of the terminal table is wider than 120 characters."""
    base = dict(device="d", loss="max_margin", dtype="bfloat16", N=65536, M=65536, D=1024, tflops=123.456, repeats=5,
                ms_q1=math.nan, ms_q3=math.nan, peak_mem_bytes=2**45)
    long_note = "worker exited with code -9: " + "a very long compiler complaint " * 12
    rows = [dict(base, backend=b, **{"pass": p}, ms_median=ms, note=long_note if b == "cpp" else "")
            for b, ms in (("torch", 9.87e6), ("openclip_compile", 0.001234), ("cpp", 12345.678))
            for p in ("forward", "backward", "full")]
    rows.append(dict(base, backend="gemm", loss="none", **{"pass": "forward"}, ms_median=3.2, note=""))
    text = report.format_table(rows)
    _assert_fits(text + "\n" + report.LEGEND + "\n" + report.table_header())
    assert "very long compiler complaint" in text and "openclip_compile" in text
    assert [len(report.format_line(line)) for line in report.summary(rows)] == [1, 1, 5]  # the note wraps onto 4 lines
    assert " 33554432 " in text  # 2⁴⁵ bytes in MiB, in its 8 characters


def test_adaptive_repeats():
    """At least ``min_repeats``; a cheap op repeats until 0.3 s of timing; a slow steady one stops at the minimum;
    a slow noisy one gets up to three times the minimum."""
    assert not adaptive_enough([1.0, 1.0], 3)
    assert not adaptive_enough([1.0] * 10, 3) and adaptive_enough([1.0] * 50, 3)  # cheap: more repeats
    assert adaptive_enough([200.0, 201.0, 199.0], 3)  # slow, steady
    noisy = [200.0, 400.0, 100.0]
    assert not adaptive_enough(noisy, 3) and adaptive_enough(noisy * 3, 3)
    x = torch.randn(64, 8, requires_grad=True)
    got = time_forward_backward(lambda: (x @ x.T).logsumexp(1).sum(), [x], repeats=4)
    assert {t.n for t in got.values()} == {4} and x.grad is None
    assert got["forward"].median <= got["full"].median and got["backward"].median <= got["full"].median
    adaptive = time_forward_backward(lambda: (x @ x.T).logsumexp(1).sum(), [x])
    assert adaptive["full"].n >= 3 and sum([adaptive["full"].median] * adaptive["full"].n) > 0


def test_forward_backward_peaks_from_one_call():
    """A forward that makes a 64 MiB temporary and a backward that makes a 64 MiB gradient: each pass's growth is
    64 MiB, and the whole is 64 MiB too (the temporary is gone before the gradient comes). In a fresh process, as
    the benchmark's memory worker measures: a long pytest session's heap may hold resident free memory."""
    if cpu_probe_reason() is not None:
        pytest.skip(cpu_probe_reason())
    code = ("import torch\n"
            "from bench.timing import forward_backward_peaks\n"
            "x = torch.ones(16 * 2**20, requires_grad=True)\n"
            "(x * 2.0).sum().backward()  # warm-up, as the worker does\n"
            "x.grad = None\n"
            "got = forward_backward_peaks(lambda: (x * 2.0).sum(), torch.device('cpu'))\n"
            "print(got['forward'], got['backward'], got['full'])\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0, out.stderr
    mib = dict(zip(("forward", "backward", "full"), (int(v) / 2**20 for v in out.stdout.split())))
    assert abs(mib["forward"] - 64) <= 2 and abs(mib["backward"] - 64) <= 2 and abs(mib["full"] - 64) <= 2, mib


def test_noisy_cells_are_flagged():
    base = dict(device="d", loss="infonce", dtype="float32", N=8, M=8, D=4, peak_mem_bytes=100, note="",
                backend="cpp", tflops=1.0, repeats=5)
    rows = [dict(base, **{"pass": "forward"}, ms_median=5.0, ms_q1=4.9, ms_q3=5.1),
            dict(base, **{"pass": "backward"}, ms_median=2.0, ms_q1=1.0, ms_q3=3.0),
            dict(base, **{"pass": "full"}, ms_median=4.0, ms_q1=3.9, ms_q3=4.1)]
    [line] = report.summary(rows)
    assert line["spread"] == pytest.approx(1.0)
    assert "NOISY: repeats spread 100% of the median (backward)" in line["note"]
    assert "forward slower than forward+backward" in line["note"]
    assert Timing.of([3.0, 1.0, 2.0, 4.0, 5.0]) == Timing(median=3.0, q1=2.0, q3=4.0, n=5)
    medians = {"forward": 1.0, "backward": 2.0, "full": 4.0}
    clean = [dict(r, ms_median=medians[r["pass"]], ms_q1=medians[r["pass"]], ms_q3=medians[r["pass"]]) for r in rows]
    assert report.summary(clean)[0]["note"] == ""


def test_cuda_timing_is_do_bench_with_every_repeat(monkeypatch):
    """On CUDA a pass is timed by ``triton.testing.do_bench`` in the process, every repeat kept (checked here with a
    stand-in do_bench: no GPU needed)."""
    testing = pytest.importorskip("triton.testing")
    seen = {}

    def fake_do_bench(fn, grad_to_none=None, return_mode="mean", **kwargs):
        fn()
        seen.update(return_mode=return_mode, grad_to_none=grad_to_none, kwargs=kwargs)
        return [3.0, 1.0, 2.0, 5.0, 4.0]

    monkeypatch.setattr(testing, "do_bench", fake_do_bench)
    leaf = torch.zeros(1, requires_grad=True)
    ran = []
    got = measure_ms(lambda: ran.append(1), torch.device("cuda"), grad_to_none=(leaf,))
    assert got == Timing(median=3.0, q1=2.0, q3=4.0, n=5) and ran == [1]
    assert seen == {"return_mode": "all", "grad_to_none": [leaf], "kwargs": {}}


def test_competitors_equal_the_reference_in_float64():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randn(9, 5, generator=g, dtype=torch.float64)
    tau = 0.05 + torch.rand(9, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 9, (6,), generator=g)
    ref = lambda **kw: float(mk.contrastive_loss(x, y, backend="torch", **kw))  # noqa: E731
    d = mk.DySTreSS(0.1, 0.2)
    assert float(competitors.openclip_infonce(x, y, tau)) == pytest.approx(ref(temperature=tau), rel=1e-12)
    assert float(competitors.openclip_infonce(x, y, None, dystress=d)) == pytest.approx(ref(temperature=d), rel=1e-12)
    assert float(competitors.openclip_infonce(x[:6], y, tau[:6], targets=targets)) == pytest.approx(
        float(mk.contrastive_loss(x[:6], y, temperature=tau[:6], targets=targets, symmetric=False, backend="torch")),
        rel=1e-12)
    for hardest in (False, True):
        got = float(competitors.openclip_max_margin(x, y, tau, hardest_negative=hardest))
        assert got == pytest.approx(ref(loss="max_margin", margin=tau, hardest_negative=hardest), rel=1e-12)
    f = competitors.loss_function("openclip", "max_margin", hardest_negative=True)
    assert float(f(x, y, tau)) == pytest.approx(ref(loss="max_margin", margin=tau, hardest_negative=True), rel=1e-12)
    assert competitors.unavailable_reason("inf_cl", torch.device("cpu")) is not None
    with pytest.raises(ValueError, match="InfoNCE"):
        competitors.loss_function("inf_cl", "max_margin")


def _siglip_formula(x, y, tau, bias):
    """−(1/N) Σ_ij log σ(z_ij (S_ij/τ_i + b)) in float64, z = +1 on the diagonal, −1 elsewhere."""
    z = 2 * torch.eye(x.shape[0], dtype=x.dtype) - 1
    return -torch.nn.functional.logsigmoid(z * ((x @ y.T) / tau[:, None] + bias)).sum() / x.shape[0]


def test_sigmoid_competitors_equal_the_formula_in_float64():
    """open_clip's SigLipLoss (the installed class) and the chunked competitor (chunks of 4 rows over 11: uneven)
    compute the SigLIP loss with per-row τ_i and the bias, values and gradients; the bench's library entry too.
    open_clip's chunked loss takes F.softplus, whose default threshold returns v itself for v > 20 (off by
    log1p(e^−v) < 2.1e-9 per pair), so it is held to 1e-9; the unchunked one (F.logsigmoid) to 1e-12."""
    if competitors.open_clip_loss_module() is None:
        pytest.skip(competitors.OPEN_CLIP_MISSING)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(11, 5, generator=g, dtype=torch.float64), torch.randn(11, 5, generator=g, dtype=torch.float64)
    tau = 0.05 + 0.1 * torch.rand(11, generator=g, dtype=torch.float64)
    ref_leaves = [x.clone().requires_grad_(), y.clone().requires_grad_(), tau.clone().requires_grad_()]
    want = _siglip_formula(*ref_leaves, competitors.SIGLIP_BIAS)
    want_grads = torch.autograd.grad(want, ref_leaves)
    chunked = functools.partial(competitors.openclip_siglip_chunked, chunk_size=4)
    for f, tol in ((competitors.openclip_siglip, 1e-12), (competitors.loss_function("openclip", "sigmoid"), 1e-12),
                   (chunked, 1e-9), (competitors.loss_function("openclip_chunked", "sigmoid"), 1e-9)):
        leaves = [x.clone().requires_grad_(), y.clone().requires_grad_(), tau.clone().requires_grad_()]
        got = f(*leaves)
        assert got.dtype == torch.float64 and float(got.detach()) == pytest.approx(float(want.detach()), rel=tol)
        for a, b in zip(torch.autograd.grad(got, leaves), want_grads):
            assert (a - b).norm() <= tol * b.norm()
    # The library through the bench's entry; the DESIGN bar for the float64 reference (the competitors above agree
    # with the formula far closer, being the same elementwise ops).
    library = worker.LOSSES["sigmoid"].library(x, y, tau, "torch")
    assert float(library) == pytest.approx(float(want.detach()), rel=1e-9)
    with pytest.raises(ValueError, match="SigLipLoss only"):
        competitors.loss_function("openclip_chunked", "infonce")


def test_sigmoid_competitors_run_where_they_can():
    """openclip_chunked gets sigmoid cells only; it runs when a requested loss is the sigmoid one."""
    cpu = torch.device("cpu")
    assert competitors.unavailable_reason("openclip_chunked", cpu, "sigmoid") is None
    assert competitors.unavailable_reason("openclip_chunked", cpu, None) is None
    assert "SigLipLoss only" in competitors.unavailable_reason("openclip_chunked", cpu, "infonce")
    args = parse_args(["--losses", "infonce", "sigmoid", "--sizes", "24", "--dims", "8", "--no-gemm"])
    cells = plan(args, cpu, ["torch", "openclip", "openclip_chunked"])
    assert [(c["backend"], c["loss"]) for c in cells] == [
        ("torch", "infonce"), ("openclip", "infonce"),
        ("torch", "sigmoid"), ("openclip", "sigmoid"), ("openclip_chunked", "sigmoid")]
    names, skipped = backends_to_run(cpu, ["torch", "openclip_chunked"], ["infonce"])
    assert names == ["torch"] and "SigLipLoss only" in skipped["openclip_chunked"]
    names, skipped = backends_to_run(cpu, ["torch", "openclip_chunked"], ["infonce", "sigmoid"])
    assert names == ["torch", "openclip_chunked"] and "openclip_chunked" not in skipped


def test_bench_sigmoid_cells(tmp_path):
    """The sigmoid rows: the library's reference, open_clip's SigLipLoss eager and the chunked one."""
    if competitors.open_clip_loss_module() is None:
        pytest.skip(competitors.OPEN_CLIP_MISSING)
    tiny = [a if a != "infonce" else "sigmoid" for a in TINY]
    proc = _run(["-m", "bench", *tiny, "--out-dir", str(tmp_path), "--backends", "torch", "openclip",
                 "openclip_chunked"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    [csv_path] = list(tmp_path.glob("*.csv"))
    rows = list(csv.DictReader(csv_path.read_text().splitlines()))
    _assert_measured(rows, ["torch", "openclip", "openclip_chunked"])
    assert {r["loss"] for r in rows if r["backend"] != "gemm"} == {"sigmoid"}
    assert "── sigmoid, float32, D = 256" in proc.stdout
    assert "SigLIP sigmoid loss" in csv_path.with_suffix(".md").read_text()


def test_chunked_float64_reference_matches_the_whole_one():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(37, 6, generator=g), torch.randn(37, 6, generator=g)
    tau = 0.05 + 0.1 * torch.rand(37, generator=g)
    whole = float(mk.info_nce(x.double(), y.double(), tau.double(), backend="torch"))
    for chunk_elems in (37 * 5, 37 * 37, 1):  # uneven chunks, one chunk, one row at a time
        assert gpu_check.chunked_infonce_fp64(x, y, tau, chunk_elems) == pytest.approx(whole, rel=1e-13)


def test_cpp_vs_gemm_tiny(tmp_path):
    out = tmp_path / "cpp.md"
    threads = torch.get_num_threads()
    try:
        cpp_vs_gemm.main(["--sizes", "64", "--dim", "16", "--repeats", "2", "--mem-size", "128", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    text = out.read_text()
    assert "| 64 | 16 |" in text and "peak RSS growth" in text and "min–max" in text
    with pytest.raises(SystemExit, match="never overwritten"):
        cpp_vs_gemm.main(["--sizes", "64", "--dim", "16", "--repeats", "1", "--mem-size", "0", "--out", str(out)])


def test_plot_schedule_tiny(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "schedule.png"
    assert plot_schedule.main(["--out", str(out), "--total-steps", "50"]) == out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="never overwritten"):
        plot_schedule.main(["--out", str(out)])


def test_cpu_memory_probe_sees_the_op_not_the_process():
    """The RSS growth of an op that touches a fresh 64 MiB buffer is 64 MiB, whatever the process held before
    (64 MiB is above glibc's largest dynamic mmap threshold, so it is mmapped even without ``MALLOC_ENV``).
    Measured in a fresh process, as the benchmark's memory worker does: a long pytest session's heap may already
    hold resident free memory that an allocation reuses unseen."""
    if cpu_probe_reason() is not None:
        pytest.skip(cpu_probe_reason())
    code = ("import torch\n"
            "from bench.timing import PeakMemory\n"
            "with PeakMemory(torch.device('cpu')) as m:\n"
            "    buf = torch.ones(16 * 2**20, dtype=torch.float32)\n"
            "    del buf\n"
            "with PeakMemory(torch.device('cpu')) as e:\n"
            "    pass\n"
            "print(m.bytes, e.bytes)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=root))
    assert out.returncode == 0, out.stderr
    op_bytes, empty_bytes = map(int, out.stdout.split())
    assert abs(op_bytes - 64 * 2**20) <= 2 * 2**20, op_bytes
    assert empty_bytes <= 2 * 2**20, empty_bytes


def test_flops_names_and_ratios():
    assert report.flops("torch", "full", 4, 4, 8) == 8 * 4 * 4 * 8
    assert report.flops("torch", "backward", 4, 4, 8) == 6 * 4 * 4 * 8
    assert report.flops("gemm", "forward", 4, 4, 8) == 2 * 4 * 4 * 8
    assert report.tflops("torch", "forward", 1000, 1000, 500, 1.0) == 2 * 1000 * 1000 * 500 / 1e-3 / 1e12
    assert math.isnan(report.tflops("torch", "full", 4, 4, 4, float("nan")))
    assert report.file_stem("NVIDIA H100 80GB HBM3", "2026-11-23") == "NVIDIA-H100-80GB-HBM3-2026-11-23"
    assert report.file_stem("AMD EPYC 7B13 (64-core) @ 2.4GHz", "d") == "AMD-EPYC-7B13-64-core-2.4GHz-d"
    base = dict(device="d", loss="infonce", dtype="float32", N=8, M=8, D=4, peak_mem_bytes=100, note="")
    rows = [dict(base, backend=b, **{"pass": p}, ms_median=ms, tflops=1.0)
            for b, ms in (("torch", 4.0), ("cpp", 2.0)) for p in ("forward", "backward", "full")]
    [ref, fast] = report.summary(rows)
    assert (ref["backend"], ref["speedup"], fast["backend"], fast["speedup"]) == ("torch", 1.0, "cpp", 2.0)


def test_each_loss_lists_its_backends_in_the_order_measured():
    """A backend that only some losses run (openclip_chunked: sigmoid) keeps its place in those losses' lines,
    before the library's backends, as the sweep measured it."""
    base = dict(device="d", dtype="float32", N=8, M=8, D=4, peak_mem_bytes=100, note="", tflops=1.0, ms_median=1.0)
    measured = [("infonce", "torch"), ("infonce", "cpp"),
                ("sigmoid", "torch"), ("sigmoid", "openclip_chunked"), ("sigmoid", "cpp")]
    rows = [dict(base, loss=loss, backend=b, **{"pass": "full"}) for loss, b in measured]
    assert [(l["loss"], l["backend"]) for l in report.summary(rows)] == measured
