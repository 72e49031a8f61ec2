"""Plot the MM-TS per-sample temperature over training steps for a few cluster sizes (and the TS baseline).

    python -m bench.plot_schedule [--out FILE.png] [--total-steps 10000] ...

Writes a new file (default bench/results/mmts-schedule-<date>-<time>.png) and refuses to overwrite an existing
--out, so a committed figure stays as it was made. Needs matplotlib (the ``plot`` extra: pip install -e ".[plot]").
"""
from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch

from mmts_kernels import schedules

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="PNG to write; must not exist (default: a new file in bench/results)")
    p.add_argument("--total-steps", type=int, default=10_000)
    p.add_argument("--n-oscillations", type=float, default=5)
    p.add_argument("--alpha", type=float, default=0.2)
    p.add_argument("--shift-min", type=float, default=0.17)
    p.add_argument("--shift-max", type=float, default=0.30)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 50, 200, 500],
                   help="cluster sizes to draw; the smallest and largest set n_min and n_max")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = RESULTS / f"mmts-schedule-{datetime.datetime.now():%Y-%m-%d-%H%M%S}.png"
    if args.out.exists():
        raise SystemExit(f"--out {args.out} exists: figures are never overwritten; choose a new file")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(f"plot_schedule needs matplotlib: pip install matplotlib (or the 'plot' extra): {exc}")

    period = args.total_steps / args.n_oscillations
    sizes = torch.tensor(sorted(args.sizes))
    steps = torch.arange(0, args.total_steps + 1, max(1, args.total_steps // 1000))
    n_min, n_max = int(sizes.min()), int(sizes.max())
    tau = torch.stack([schedules.mmts_temperature(int(s), period, sizes, args.alpha, args.shift_min,
                                                  args.shift_max, n_min=n_min, n_max=n_max)
                       for s in steps])  # [T, K]
    ts = [schedules.cosine_temperature(int(s), args.shift_min - args.alpha / 2, args.shift_max + args.alpha / 2,
                                       period) for s in steps]

    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=120)
    colors = plt.cm.viridis(torch.linspace(0.0, 0.9, len(sizes)).tolist())
    for k, (n, c) in enumerate(zip(sizes.tolist(), colors)):
        ax.plot(steps, tau[:, k], color=c, lw=1.8, label=f"MM-TS, cluster size {n}")
    ax.plot(steps, ts, color="gray", lw=1.0, ls="--", label="TS (one τ for all samples)")
    ax.set_xlabel("training step")
    ax.set_ylabel("temperature τ (or margin)")
    ax.set_title(f"MM-TS: α={args.alpha}, shift ∈ [{args.shift_min}, {args.shift_max}], "
                 f"T = {args.total_steps}/{args.n_oscillations:g} steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    plt.close(fig)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
