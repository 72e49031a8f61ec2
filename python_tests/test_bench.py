"""Smoke tests of the benchmark (`python -m bench`), plus the pieces it rests on: the CPU peak-memory probe, FLOP
counting and file names. The long-tail experiment (`python -m bench.longtail`) is tested in test_longtail.py."""
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

from bench import report  # noqa: E402
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
