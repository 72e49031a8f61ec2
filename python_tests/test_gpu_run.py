"""The GPU session's one command (`bash bench/gpu_run.sh OUTDIR`, `python -m bench.gpu_run`) run on the CPU with tiny
cells: its sections end to end through the shell wrapper, rows on disk the moment they are measured, a budget cut
that keeps what came before it, a failing item that does not stop the run, the tile sweep under Triton's
interpreter, the goals of issue 11, and no import the GPU machine lacks."""
from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `bench` is not an installed package: import it from the checkout

from bench import gpu_check, gpu_run  # noqa: E402
from support import backend_marker  # noqa: E402

# Tiny cells on the CPU (the cpp backend when it is built, else torch), two competitors, one timed repeat.
CPU_ARGS = ["--device", "cpu", "--repeats", "1", "--competitors", "openclip", "torch"]


def _files(out):
    [csv_path] = list(out.glob("gpu-run-*.csv"))
    return csv_path, csv_path.with_suffix(".md")


def _rows(csv_path):
    return list(csv.DictReader(csv_path.read_text().splitlines()))


def test_the_shell_command_runs_every_section_and_writes_both_files(tmp_path):
    """Through bench/gpu_run.sh, with the usual extras made unimportable: the GPU machine has torch, triton,
    pytest and hypothesis, and no package registry."""
    out, block = tmp_path / "out", tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(
        "import sys\nfor m in ('matplotlib', 'tqdm', 'pandas', 'scipy', 'numba'):\n    sys.modules[m] = None\n")
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(block))
    proc = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_run.sh"), str(out), *CPU_ARGS,
                           "--sections", "headline", "profile", "correctness", "tests"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    csv_path, md_path = _files(out)
    rows = _rows(csv_path)
    sections = {r["section"] for r in rows}
    assert {"env", "speed", "goal", "profile", "correctness"} <= sections
    speed = {(r["name"], r["method"], r["metric"]) for r in rows if r["section"] == "speed"}
    assert {("bf16", "openclip", "full_ms"), ("bf16", "torch", "full_ms"), ("bf16", "gemm", "ms")} <= speed
    backend = next(r["note"] for r in rows if r["section"] == "env" and r["name"] == "backend")
    head_full = [float(r["value"]) for r in rows
                 if (r["name"], r["method"], r["metric"]) == ("bf16", backend, "full_ms")]
    assert len(head_full) == 1 and head_full[0] > 0
    profile = [r for r in rows if r["section"] == "profile"]
    assert profile and all(float(r["value"]) >= 0 for r in profile)
    correctness = [r for r in rows if r["section"] == "correctness"]
    assert correctness and all(r["status"] == "PASS" for r in correctness)
    assert {r["metric"] for r in rows if r["section"] == "goal" and r["name"] == "bf16"} >= {
        "fwd+bwd ≥ 40% of the GEMM rate", "forward ≤ 1/3 of fwd+bwd"}
    text = md_path.read_text()
    for heading in ("## Headline", "## Kernels of one forward+backward", "## Correctness against the float64 "
                    "reference", "## GPU tests", "## Summary"):
        assert heading in text
    assert "not run: no CUDA device" in text and "correctness: all PASS" in text
    assert text.splitlines()[0] in proc.stdout  # the markdown is echoed as it is written


def test_rows_are_on_disk_the_moment_they_are_measured(tmp_path, monkeypatch):
    """A section that runs after the headline finds the headline's rows already in both files; every goal row
    follows with its goal."""
    seen = {}

    def probe(run):
        csv_path, md_path = _files(tmp_path)
        seen["csv"] = {(r["section"], r["name"]) for r in _rows(csv_path)}
        seen["md"] = md_path.read_text()

    monkeypatch.setitem(gpu_run.SECTIONS, "probe", probe)
    assert gpu_run.main(["--out", str(tmp_path), "--device", "cpu", "--backend", "torch", "--repeats", "1",
                         "--competitors", "--sections", "headline", "probe", "goals"]) == 0
    assert ("speed", "bf16") in seen["csv"] and ("goal", "bf16") in seen["csv"]
    assert ("speed", "fp32/highest") not in seen["csv"]
    assert "| bf16 | 64 | 32 |" in seen["md"] and "fp32/highest" not in seen["md"]
    rows = _rows(_files(tmp_path)[0])
    goal_rows = [r for r in rows if r["section"] == "goal" and r["name"] != "bf16"]
    judged = list(dict.fromkeys(r["name"] for r in goal_rows if r["status"] in ("PASS", "FAIL")))
    assert judged == [row.key for row in gpu_run.GOAL_ROWS]  # every row measured, with a verdict


def test_a_budget_cut_keeps_the_earlier_rows_and_skips_the_rest(tmp_path, monkeypatch):
    time_row = gpu_check.time_row

    def slow_time_row(*args, **kwargs):  # the headline alone spends the whole budget
        got = time_row(*args, **kwargs)
        time.sleep(1.2)
        return got

    monkeypatch.setattr(gpu_check, "time_row", slow_time_row)
    assert gpu_run.main(["--out", str(tmp_path), *CPU_ARGS, "--budget", "1",
                         "--sections", "headline", "profile", "correctness", "goals"]) == 0
    csv_path, md_path = _files(tmp_path)
    rows = _rows(csv_path)
    head = [r for r in rows if r["section"] == "speed" and r["name"] == "bf16"]
    assert head and any(math.isfinite(float(r["value"])) for r in head)
    skipped = [r for r in rows if r["metric"] == "skipped"]
    assert {r["section"] for r in skipped} == {"profile", "correctness", "goals"}
    assert len([r for r in skipped if r["section"] == "goals"]) == len(gpu_run.GOAL_ROWS)
    assert all("time budget" in r["note"] for r in skipped)
    assert not [r for r in rows if r["section"] in ("profile", "correctness") and r["metric"] != "skipped"]
    text = md_path.read_text()
    assert "skipped: time budget" in text and "skipped over the time budget: profile: profile" in text


def test_a_failing_item_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    check_case = gpu_check.check_case
    calls = []

    def first_fails(case, *args, **kwargs):
        calls.append(case)
        if len(calls) == 1:
            raise RuntimeError("kernel exploded")
        return check_case(case, *args, **kwargs)

    monkeypatch.setattr(gpu_check, "check_case", first_fails)
    status = gpu_run.main(["--out", str(tmp_path), *CPU_ARGS, "--sections", "correctness"])
    rows = [r for r in _rows(_files(tmp_path)[0]) if r["section"] == "correctness"]
    assert rows[0]["metric"] == "failed" and "kernel exploded" in rows[0]["note"] and rows[0]["status"] == "FAIL"
    assert len(calls) == len(gpu_check.config(torch.device("cpu"), quick=True, tiny=True).cases) > 1
    assert [r for r in rows[1:] if r["status"] == "PASS"]  # the later cases ran
    assert status == 1  # a correctness failure is the exit status


@backend_marker("triton")
def test_the_triton_backend_under_the_interpreter_sweep_and_correctness(tmp_path):
    """The tile sweep times each configuration; the correctness cases pass against float64."""
    assert gpu_run.main(["--out", str(tmp_path), "--device", "cpu", "--backend", "triton", "--repeats", "1",
                         "--competitors", "--sections", "headline", "sweep", "correctness",
                         "--sweep", "", "block_n=32"]) == 0
    rows = _rows(_files(tmp_path)[0])
    full = {r["name"]: float(r["value"]) for r in rows if r["section"] == "sweep" and r["metric"] == "full_ms"}
    assert list(full) == ["(default)", "block_n=32"] and all(v > 0 for v in full.values())
    assert "| block_n=32 |" in _files(tmp_path)[1].read_text()
    correctness = [r for r in rows if r["section"] == "correctness"]
    assert correctness and all(r["status"] == "PASS" and r["method"] == "triton" for r in correctness)


def _speed(name, N, D, mode="infonce", precision="", ms=None):
    return [dict(section="speed", name=name, dtype="bfloat16", precision=precision, N=N, M=N, D=D, mode=mode,
                 method=method, metric=metric, value=v) for (method, metric), v in (ms or {}).items()]


def test_goals_are_judged_on_the_runs_own_numbers():
    N, D = 16384, 512
    gemm_ms = 2 * N * N * D / 1e9 / 500  # a 500 TFLOP/s GEMM
    head = _speed("bf16", N, D, ms={("triton", "full_ms"): 5.0, ("triton", "fwd_ms"): 1.5,
                                   ("triton", "peak_extra_mib"): 10.0, ("openclip", "full_ms"): 20.0,
                                   ("openclip", "peak_extra_mib"): 1000.0, ("openclip_compile", "full_ms"): 6.0,
                                   ("gemm", "ms"): gemm_ms})
    verdict = {g["metric"]: g["status"] for g in gpu_check.row_goals(head, head, "triton")}
    assert verdict == {"fwd+bwd ≥ 40% of the GEMM rate": "PASS",  # 8·N²·D in 5 ms: 220 TFLOP/s, 44%
                       "≥ 1.5× faster than openclip_compile": "FAIL", "≥ 3× faster than openclip (eager)": "PASS",
                       "peak extra memory ≤ 2% of openclip's": "PASS", "forward ≤ 1/3 of fwd+bwd": "PASS"}
    for name, N_row, mode, precision, full, status in (("bf16 dystress", N, "dystress", "", 6.75, "FAIL"),
                                                       ("bf16 N=65536", 4 * N, "infonce", "", 80.0, "PASS"),
                                                       ("fp32/highest", N, "infonce", "highest", 14.5, "PASS")):
        row = _speed(name, N_row, D, mode, precision, ms={("triton", "full_ms"): full})
        [g] = gpu_check.row_goals(row, head, "triton")
        assert g["value"] == pytest.approx(full / 5.0) and g["status"] == status, g
    [g] = gpu_check.row_goals(_speed("bf16 max_margin", N, D, "max_margin", ms={("triton", "full_ms"): math.nan}),
                              head, "triton")
    assert g["status"] == "n/a"  # not measured: neither pass nor fail


def test_the_sigmoid_row_is_judged_against_the_materialized_loss():
    """Issue 18's sigmoid row: half the materialized loss's time and 5% of its peak memory, and the InfoNCE bar."""
    N, D = 16384, 512
    head = _speed("bf16", N, D, ms={("triton", "full_ms"): 5.0})
    row = _speed("bf16 sigmoid", N, D, "sigmoid", ms={("triton", "full_ms"): 6.0, ("triton", "peak_extra_mib"): 40.0,
                                                     ("openclip", "full_ms"): 15.0,
                                                     ("openclip", "peak_extra_mib"): 1000.0})
    verdict = {g["metric"]: (g["status"], g["value"]) for g in gpu_check.row_goals(row, head, "triton")}
    assert verdict == {"≤ 0.5× the materialized sigmoid's time": ("PASS", pytest.approx(0.4)),
                       "peak extra memory ≤ 5% of the materialized sigmoid's": ("PASS", pytest.approx(0.04)),
                       "≤ 1.3× the bf16 InfoNCE time": ("PASS", pytest.approx(1.2))}
    assert gpu_run.GOAL_ROWS[-1].mode == "sigmoid"  # late: after every row of issue 11


def test_the_materialized_sigmoid_is_the_librarys_loss():
    """The speed row's baseline (open_clip's SigLipLoss formula) computes the loss the fused kernels compute."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(13, 5, generator=g, dtype=torch.float64), torch.randn(13, 5, generator=g, dtype=torch.float64)
    tau = 0.05 + torch.rand(13, generator=g, dtype=torch.float64)
    import mmts_kernels as mk

    want = mk.sigmoid_loss(x, y, tau, -10.0, backend="torch")
    # 1e-9, not 1e-12: the torch backend's F.softplus returns v itself above v = 20 (off by up to 2.1e-9 a term),
    # logsigmoid does not
    assert torch.allclose(gpu_check.materialized_sigmoid(x, y, tau), want, rtol=1e-9, atol=0)


def test_the_sweep_configurations_parse_and_differ():
    from mmts_kernels.triton_backend import op

    configs = [op._parse_config(spec, op.GPU_CONFIG) for spec in gpu_run.SWEEP]  # raises on a malformed field
    assert configs[0] == op.GPU_CONFIG and len(set(configs)) == len(configs)
