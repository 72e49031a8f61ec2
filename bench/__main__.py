"""`make bench`: forward+backward time of the losses on every backend that runs here, against the reference.

Prints one table; times are medians of repeated runs after a warm-up.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import mmts_kernels as mk


def time_fwd_bwd(backend: str, N: int, D: int, device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1).to(device, dtype).requires_grad_()
    y = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1).to(device, dtype).requires_grad_()
    tau = (0.05 + 0.1 * torch.rand(N, generator=g)).to(device)

    def step():
        mk.info_nce(x, y, tau, backend=backend).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32
    usable = [name for name, reason in mk.available_backends().items()
              if reason is None and mk.backends.unavailable_reason(name, device) is None]
    print(f"device={device.type} dtype={dtype} D={args.dim} loss=symmetric InfoNCE, per-sample tau, fwd+bwd")
    print(f"{'backend':>8} {'N':>7} {'ms (median)':>12} {'vs torch':>9}")
    for N in args.sizes:
        ref = None
        for name in ["torch"] + [b for b in usable if b != "torch"]:
            ms = time_fwd_bwd(name, N, args.dim, device, dtype, args.repeats)
            ref = ms if name == "torch" else ref
            print(f"{name:>8} {N:>7} {ms:>12.2f} {ref / ms:>8.2f}x")


if __name__ == "__main__":
    main()
