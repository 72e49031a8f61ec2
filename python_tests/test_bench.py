"""Smoke tests of the benchmark (`python -m bench`) and of the long-tail experiment (`python -m bench.longtail`),
plus the pieces they rest on: the CPU peak-memory probe, FLOP counting, file names and the schedules' ranges."""
from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `bench` is not an installed package: import it from the checkout

from bench import longtail, report  # noqa: E402
from bench.timing import PeakMemory, cpu_probe_reason  # noqa: E402


def _run(args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_bench_writes_the_csv_with_the_exact_header(tmp_path):
    proc = _run(["-m", "bench", "--sizes", "64", "--repeats", "1", "--no-plot", "--no-progress", "--backends",
                 "torch", "--losses", "infonce", "--threads", "1", "--out-dir", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    [csv_path] = [p for p in tmp_path.iterdir() if p.suffix == ".csv"]
    with open(csv_path) as f:
        lines = f.read().splitlines()
    assert lines[0] == "device,backend,loss,dtype,N,M,D,pass,ms_median,peak_mem_bytes,tflops"
    rows = list(csv.DictReader(lines))
    assert {(r["backend"], r["pass"]) for r in rows} == {("gemm", "forward"), ("torch", "forward"),
                                                         ("torch", "backward"), ("torch", "full")}
    for r in rows:
        assert (r["N"], r["M"], r["D"]) == ("64", "64", "256")
        assert math.isfinite(float(r["ms_median"])) and float(r["ms_median"]) > 0
        assert float(r["tflops"]) > 0
    md = csv_path.with_suffix(".md").read_text()
    assert "torch" in md and "command" in md and torch.__version__ in md
    assert "fwd+bwd ms" in proc.stdout  # the table on stdout


def test_cpu_memory_probe_sees_the_op_not_the_process():
    """The RSS growth of an op that touches a fresh 64 MiB buffer is 64 MiB, whatever the process held before
    (64 MiB is above glibc's largest dynamic mmap threshold, so it is mmapped even without ``MALLOC_ENV``)."""
    if cpu_probe_reason() is not None:
        pytest.skip(cpu_probe_reason())
    with PeakMemory(torch.device("cpu")) as m:
        buf = torch.ones(16 * 2**20, dtype=torch.float32)
        del buf
    assert abs(m.bytes - 64 * 2**20) <= 2 * 2**20, m.bytes
    with PeakMemory(torch.device("cpu")) as m:
        pass
    assert m.bytes <= 2 * 2**20, m.bytes


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


def test_longtail_schedules_share_the_base_range():
    cfg = longtail.QUICK
    sizes = torch.tensor([5, 50, 500])
    for step in range(0, cfg.steps, 7):
        assert cfg.ts_min <= longtail.schedule_value("TS", cfg, step, sizes) <= cfg.ts_max
        tau = longtail.schedule_value("MM-TS", cfg, step, sizes)
        assert tau[0] < tau[2]  # the head cluster gets the higher temperature
        assert 0.03 - 1e-6 <= float(tau.min()) and float(tau.max()) <= 0.17 + 1e-6
        m = longtail.schedule_value("MM-TS-mm", cfg, step, sizes)
        assert 0.06 - 1e-6 <= float(m.min()) and float(m.max()) <= 0.34 + 1e-6
    sizes = longtail.zipf_sizes(cfg)
    assert bool((sizes[:-1] >= sizes[1:]).all()) and int(sizes.min()) >= cfg.min_cluster


def test_longtail_tiny_run(tmp_path):
    threads = torch.get_num_threads()
    try:
        longtail.main(["--seeds", "1", "--steps", "10", "--samples", "300", "--clusters", "6", "--batch", "16",
                       "--no-plot", "--no-progress", "--out-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    [md] = list(tmp_path.glob("longtail-*.md"))
    text = md.read_text()
    for method in longtail.METHODS:
        assert f"| {method} |" in text
    assert "tail R@1" in text and "seeds" in text
