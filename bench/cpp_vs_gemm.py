"""The cpp backend against the torch reference and against the arithmetic floor, on this CPU.

    python -m bench.cpp_vs_gemm [--sizes 8192] [--dim 256] [--repeats 3] [--mem-size 16384] [--out FILE.md]

Time: forward + backward of fp32 symmetric InfoNCE with a per-sample temperature, for the cpp backend and the
torch reference, next to the time of three bare GEMMs (S = x·yᵀ, S·y, Sᵀ·x: what any implementation must at
least compute), all measured in the same run; medians after a warm-up. Ratios are what to compare across
machines, not the absolute times.

Memory: peak RSS growth (VmHWM of /proc/self/status) of one fwd+bwd in a fresh subprocess per backend, after the
inputs, their gradients and the extension are in memory, so the number is the loss's own working memory.
"""
from __future__ import annotations

import argparse
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


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (and, for cpp, the first-use build)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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

    out = {"N": N, "D": D, "gemm3_s": median_time(gemms, repeats)}
    for backend in ("cpp", "torch"):
        out[f"{backend}_s"] = median_time(loss(backend), repeats)
    return out


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mem-size", type=int, default=16384, help="N = M of the memory measurement (0: skip)")
    parser.add_argument("--out", type=str, default=None, help="also write the results as Markdown here")
    args = parser.parse_args(argv)

    reason = mk.backends.unavailable_reason("cpp", torch.device("cpu"))
    if reason is not None:
        sys.exit(f"the cpp backend cannot run here: {reason}")
    header = (f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}), "
              f"torch {torch.__version__}, fp32, symmetric InfoNCE, per-sample tau, fwd+bwd")
    lines = [header, "",
             "| N = M | D | 3 GEMMs (s) | cpp (s) | torch (s) | cpp / 3 GEMMs | cpp / torch |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    print(header)
    for N in args.sizes:
        r = time_one_size(N, args.dim, args.repeats)
        row = (f"| {N} | {args.dim} | {r['gemm3_s']:.3f} | {r['cpp_s']:.3f} | {r['torch_s']:.3f} | "
               f"{r['cpp_s'] / r['gemm3_s']:.2f} | {r['cpp_s'] / r['torch_s']:.2f} |")
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
    if args.out:
        command = "python -m bench.cpp_vs_gemm " + " ".join(argv if argv is not None else sys.argv[1:])
        text = [f"# cpp backend vs torch reference vs three GEMMs ({time.strftime('%Y-%m-%d')})", "",
                f"Command: `{command.strip()}`", ""] + lines
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
