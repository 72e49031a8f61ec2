"""The cpp backend against the torch reference and against the arithmetic floor, on this CPU.

    python -m bench.cpp_vs_gemm [--sizes 8192] [--dim 256] [--repeats 3] [--mem-size 16384] [--out FILE.md]

Writes a new markdown file every run (default bench/results/cpu-cpp-vs-gemm-<date>-<time>.md); it refuses to
overwrite an existing --out, so results quoted elsewhere stay as they were measured.

Time: forward + backward of fp32 symmetric InfoNCE with a per-sample temperature, for the cpp backend and the
torch reference, next to the time of three bare GEMMs (S = x·yᵀ, S·y, Sᵀ·x, 2·N·N·D FLOPs each: what any
implementation must at least compute), all measured in the same run; medians after a warm-up, with the min–max
of the repeats (a row whose range exceeds half its median is marked NOISY). Ratios are what to compare across
machines, not the absolute times.

Memory: peak RSS growth (VmHWM of /proc/self/status) of one fwd+bwd in a fresh subprocess per backend, after the
inputs, their gradients and the extension are in memory, so the number is the loss's own working memory.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import mmts_kernels as mk


def make_inputs(N: int, D: int):
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1).requires_grad_()
    y = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1).requires_grad_()
    tau = 0.05 + 0.1 * torch.rand(N, generator=g)
    return x, y, tau


NOISY_RANGE = 0.5  # (max − min) / median of the repeats above which a row is marked NOISY


def repeat_times(fn, repeats: int):
    """(min, median, max) seconds of ``repeats`` calls after one warm-up call (for cpp: the first-use build)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times), max(times)


def time_one_size(N: int, D: int, repeats: int) -> dict:
    x, y, tau = make_inputs(N, D)
    xd, yd = x.detach(), y.detach()

    def gemms():
        S = xd @ yd.T
        S @ yd
        S.T @ xd

    def loss(backend):
        def run():
            x.grad = y.grad = None
            mk.info_nce(x, y, tau, backend=backend).backward()
        return run

    out = {"N": N, "D": D}
    for name, fn in (("gemm3", gemms), ("cpp", loss("cpp")), ("torch", loss("torch"))):
        out[f"{name}_min"], out[f"{name}_s"], out[f"{name}_max"] = repeat_times(fn, repeats)
    return out


def spread_note(r: dict) -> str:
    """"NOISY: …" naming the timings whose repeats ranged wider than ``NOISY_RANGE`` of their median, else ""."""
    wide = [name for name in ("gemm3", "cpp", "torch")
            if (r[f"{name}_max"] - r[f"{name}_min"]) > NOISY_RANGE * r[f"{name}_s"]]
    return f"NOISY: {', '.join(wide)}" if wide else ""


def _range(r: dict, name: str) -> str:
    return f"{r[f'{name}_s']:.3f} ({r[f'{name}_min']:.3f}–{r[f'{name}_max']:.3f})"


_MEM_SCRIPT = """
import json, sys, torch, mmts_kernels as mk
from bench.cpp_vs_gemm import make_inputs
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
backend, N, D = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
x, y, tau = make_inputs(N, D)
mk.info_nce(x[:512], y[:512], tau[:512], backend=backend).backward()   # load libraries, warm up
x.grad, y.grad = torch.zeros_like(x), torch.zeros_like(y)             # gradients exist before the baseline
base = hwm()
mk.info_nce(x, y, tau, backend=backend).backward()
print(json.dumps({"backend": backend, "growth_bytes": hwm() - base}))
"""


def peak_memory_growth(backend: str, N: int, D: int) -> int:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, backend, str(N), str(D)], capture_output=True,
                         text=True, env=env, cwd=root, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["growth_bytes"]


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mem-size", type=int, default=16384, help="N = M of the memory measurement (0: skip)")
    parser.add_argument("--out", type=str, default=None,
                        help="the markdown file to write (must not exist; default: a new file in bench/results)")
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    if args.out is None:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
        args.out = str(root / "bench" / "results" / f"cpu-cpp-vs-gemm-{stamp}.md")
    if Path(args.out).exists():
        sys.exit(f"--out {args.out} exists: results are never overwritten; choose a new file")

    reason = mk.backends.unavailable_reason("cpp", torch.device("cpu"))
    if reason is not None:
        sys.exit(f"the cpp backend cannot run here: {reason}")
    header = (f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}), "
              f"torch {torch.__version__}, fp32, symmetric InfoNCE, per-sample tau, fwd+bwd")
    lines = [header, "",
             "Times: median (min–max) of the repeats, in seconds.", "",
             "| N = M | D | 3 GEMMs (s) | cpp (s) | torch (s) | cpp / 3 GEMMs | cpp / torch | note |",
             "|---:|---:|---:|---:|---:|---:|---:|---|"]
    print(header)
    for N in args.sizes:
        r = time_one_size(N, args.dim, args.repeats)
        row = (f"| {N} | {args.dim} | {_range(r, 'gemm3')} | {_range(r, 'cpp')} | {_range(r, 'torch')} | "
               f"{r['cpp_s'] / r['gemm3_s']:.2f} | {r['cpp_s'] / r['torch_s']:.2f} | {spread_note(r)} |")
        lines.append(row)
        print(row, flush=True)
    if args.mem_size:
        lines += ["", "| N = M | D | backend | peak RSS growth (MiB) |", "|---:|---:|---|---:|"]
        growth = {}
        for backend in ("cpp", "torch"):
            growth[backend] = peak_memory_growth(backend, args.mem_size, args.dim)
            row = f"| {args.mem_size} | {args.dim} | {backend} | {growth[backend] / 2**20:.1f} |"
            lines.append(row)
            print(row, flush=True)
        ratio = f"cpp / torch peak memory growth: {growth['cpp'] / max(growth['torch'], 1):.3f}"
        lines += ["", ratio]
        print(ratio)
    command = "python -m bench.cpp_vs_gemm " + " ".join(argv if argv is not None else sys.argv[1:])
    text = [f"# cpp backend vs torch reference vs three GEMMs ({time.strftime('%Y-%m-%d')})", "",
            f"Command: `{command.strip()}`", ""] + lines
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "x") as f:
        f.write("\n".join(text) + "\n")
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
