"""`python -m bench.triton_sweep`: the Triton backend's tile configurations against each other, in one process.

For each configuration (``MMTS_KERNELS_TRITON_CONFIG`` syntax, fields of ``mmts_kernels.triton_backend.op.Config``)
it times forward, backward and forward+backward of one loss cell with ``bench.worker.measure_passes`` (GPU:
``triton.testing.do_bench`` medians; peak extra memory from the caching allocator), and prints TFLOP/s at 8·N·M·D
per forward+backward next to a bare GEMM of the same dtype measured in the same run, so a sweep reads directly as a
fraction of the GEMM rate. A configuration that fails to compile or run becomes a note, not a crash.

    python -m bench.triton_sweep                           # the issue-11 headline cell, built-in configurations
    python -m bench.triton_sweep --n 16384 --d 512 --dtype bfloat16 --loss infonce \\
        --configs "block_n=128,block_m=64" "block_n=64,block_m=128,num_warps=4"

Needs a CUDA GPU (``--tiny`` runs a tiny cell anywhere, for the tests: the interpreter on a CPU).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

import mmts_kernels as mk

from . import report
from .timing import measure_ms
from .worker import measure_passes

DEFAULT_CONFIGS = [
    "",  # the pinned default
    "block_n=128,block_m=64,block_d=64,num_warps=8,num_stages=4",
    "block_n=64,block_m=128,block_d=64,num_warps=4,num_stages=3",
    "block_n=64,block_m=64,block_d=64,num_warps=4,num_stages=4",
    "block_n=128,block_m=64,block_d=32,num_warps=8,num_stages=4",
    "bwd_panel_factor=2",
]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ENV = "MMTS_KERNELS_TRITON_CONFIG"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.triton_sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16384, help="N = M")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--loss", choices=["infonce", "max_margin", "hardest", "dystress"], default="infonce")
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                   help=f"{ENV} values; an empty string is the default configuration")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats on a CPU (a GPU: do_bench decides)")
    p.add_argument("--tiny", action="store_true", help="a tiny cell on whatever device is here (tests)")
    return p.parse_args(argv)


def _loss_fn(loss: str, x, y, tau):
    if loss == "infonce":
        return lambda: mk.info_nce(x, y, tau, backend="triton")
    if loss == "dystress":
        return lambda: mk.info_nce(x, y, mk.DySTreSS(0.1, 0.2), backend="triton")
    return lambda: mk.max_margin(x, y, 0.2, hardest_negative=loss == "hardest", backend="triton")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n, d = (48, 8) if args.tiny else (args.n, args.d)
    if device.type != "cuda" and not args.tiny:
        print("bench.triton_sweep needs a CUDA GPU (or --tiny)", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(n, d, device=device, generator=g), dim=-1).to(dtype)
    y = torch.nn.functional.normalize(torch.randn(n, d, device=device, generator=g), dim=-1).to(dtype)
    x.requires_grad_()
    y.requires_grad_()
    tau = 0.05 + 0.1 * torch.rand(n, device=device, generator=g)
    flops = 8.0 * n * n * d

    xd, yd = x.detach(), y.detach()
    gemm_ms = measure_ms(lambda: xd @ yd.T, device, repeats=args.repeats).median
    gemm_rate = 2.0 * n * n * d / gemm_ms / 1e9
    print(f"device {report.device_name(device)}, {args.dtype}, N = M = {n}, D = {d}, loss {args.loss}; "
          f"bare GEMM {gemm_ms:.3f} ms = {gemm_rate:.0f} TFLOP/s")
    print(f"{'configuration':<64} {'fwd ms':>8} {'bwd ms':>8} {'total ms':>9} {'TFLOP/s':>8} {'of GEMM':>8} "
          f"{'MiB':>8}")
    previous = os.environ.get(ENV)
    try:
        for spec in args.configs:
            if spec:
                os.environ[ENV] = spec
            else:
                os.environ.pop(ENV, None)
            result = measure_passes(_loss_fn(args.loss, x, y, tau), [x, y], device, args.repeats,
                                    measure="both" if device.type == "cuda" else "time")  # CPU memory: fresh processes
            by_pass = {r["pass"]: r for r in result["rows"]}
            ms = {p: (by_pass.get(p, {}).get("ms") or float("nan")) for p in ("forward", "backward", "full")}
            if ms["full"] != ms["full"]:  # NaN: the configuration failed
                print(f"{spec or '(default)':<64} {result['note'] or by_pass.get('full', {}).get('note', '')}")
                continue
            rate = flops / ms["full"] / 1e9
            mem = by_pass["full"].get("mem")
            print(f"{spec or '(default)':<64} {ms['forward']:8.3f} {ms['backward']:8.3f} {ms['full']:9.3f} "
                  f"{rate:8.1f} {rate / gemm_rate:8.1%} {mem / 2**20 if mem is not None else float('nan'):8.1f}")
    finally:
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous
    return 0


if __name__ == "__main__":
    sys.exit(main())
