"""`python -m bench.longtail`: a controlled long-tail retrieval experiment — does a per-sample temperature or
margin from the size of a sample's semantic cluster (MM-TS) change retrieval of head, middle and tail clusters?

Data (synthetic, paired, two modalities). K latent semantic clusters whose sizes follow a Zipf law,
n_k ∝ k^(−s). Sample i of cluster c_i has a latent z_i = μ_{c_i} + σ_w·ε_i (μ_k: random cluster centres; ε_i: the
instance detail that tells pairs of one cluster apart). The two modalities see z_i through different fixed random
non-linear maps plus independent noise: x_i = tanh(A z_i) + σ_n·ξ_i, y_i = tanh(B z_i) + σ_n·ξ'_i. Each cluster is
split 80/20 into training and held-out pairs (at least 2 held out per cluster).

Model: two MLP towers (x → embedding, y → embedding), L2-normalized outputs, Adam, batches drawn uniformly
from the training pairs (so head clusters dominate batches, as in real data).

Methods — for each seed all of them share the data, the initial weights, the batch order and the step count:
  (a) fixed-τ     InfoNCE, τ = 0.1
  (b) TS          InfoNCE, τ(t) = mk.schedules.cosine_temperature(t, 0.05, 0.15, period)
  (c) MM-TS       InfoNCE, τ_i(t) = mk.schedules.mmts_temperature(t, period, n_{c_i}, α=0.10, sh ∈ [0.08, 0.12])
  (d) max-margin  fixed margin 0.2
  (e) MM-TS-mm    max-margin, per-sample margin m_i(t) = mmts_temperature(t, period, n_{c_i}, α=0.20,
                  sh ∈ [0.16, 0.24])
Fairness: τ schedules share the centre 0.1 and the oscillation amplitude ±0.05 of TS (MM-TS adds its per-sample
shift ±0.02 around it), margins are the InfoNCE setting scaled ×2 around the 0.2 baseline; TS and MM-TS use the same
period (steps / 5, the MM-TS default of 5 oscillations). The MM-TS shift uses the cluster sizes n_c over the whole
training set (min and max over all clusters), so it does not depend on the batch. Nothing was tuned per method.

Evaluation on the held-out pairs: x → y and y → x retrieval (each query's own partner is the positive), R@1/5/10
averaged over the two directions, overall and for the queries of head, middle and tail clusters (terciles of the
clusters ranked by training size); mean ± std over seeds. Also the cluster-level mAP (relevance: same cluster).
Outputs: a table on stdout, bench/results/longtail-<date>[-quick].md and .png.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Dict, List

import torch
import torch.nn.functional as F

import mmts_kernels as mk
from mmts_kernels import metrics

from .progress import progress

METHODS = ("fixed-tau", "TS", "MM-TS", "max-margin", "MM-TS-mm")
TERCILES = ("overall", "head", "middle", "tail")
KS = (1, 5, 10)
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass(frozen=True)
class Config:
    clusters: int = 60
    samples: int = 16000        # training + held-out pairs, before the per-cluster minimum
    zipf: float = 1.1
    min_cluster: int = 8        # every cluster keeps at least this many pairs
    latent_dim: int = 16
    within: float = 0.6         # σ_w, relative to unit-norm cluster centres scaled by `spread`
    spread: float = 2.0
    noise: float = 0.6          # σ_n on each modality
    feature_dim: int = 64
    hidden: int = 256
    embed_dim: int = 32
    steps: int = 1500
    batch: int = 256
    lr: float = 2e-3
    seeds: int = 5
    # schedules
    tau: float = 0.1
    ts_min: float = 0.05
    ts_max: float = 0.15
    mmts_alpha: float = 0.10
    mmts_shift: tuple = (0.08, 0.12)
    margin: float = 0.2
    mm_alpha: float = 0.20
    mm_shift: tuple = (0.16, 0.24)
    oscillations: int = 5

    @property
    def period(self) -> float:
        return self.steps / self.oscillations


QUICK = Config(clusters=30, samples=6000, steps=400, batch=128, seeds=3)


# ---------------------------------------------------------------------------------------------------------------
# Data

@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    c_train: torch.Tensor       # cluster of each training pair
    x_test: torch.Tensor
    y_test: torch.Tensor
    c_test: torch.Tensor
    cluster_sizes: torch.Tensor  # [K] training-set size of each cluster
    tercile: torch.Tensor        # [K] 0 head, 1 middle, 2 tail


def zipf_sizes(cfg: Config) -> torch.Tensor:
    w = torch.arange(1, cfg.clusters + 1, dtype=torch.float64) ** (-cfg.zipf)
    return torch.clamp((cfg.samples * w / w.sum()).round().long(), min=cfg.min_cluster)


def make_data(cfg: Config, seed: int) -> Data:
    g = torch.Generator().manual_seed(10_000 + seed)
    sizes = zipf_sizes(cfg)
    labels = torch.repeat_interleave(torch.arange(cfg.clusters), sizes)
    centres = cfg.spread * F.normalize(torch.randn(cfg.clusters, cfg.latent_dim, generator=g), dim=1)
    z = centres[labels] + cfg.within * torch.randn(len(labels), cfg.latent_dim, generator=g)
    maps = [torch.randn(cfg.latent_dim, cfg.feature_dim, generator=g) / math.sqrt(cfg.latent_dim) for _ in range(2)]
    x = torch.tanh(z @ maps[0]) + cfg.noise * torch.randn(len(labels), cfg.feature_dim, generator=g)
    y = torch.tanh(z @ maps[1]) + cfg.noise * torch.randn(len(labels), cfg.feature_dim, generator=g)
    test = torch.zeros(len(labels), dtype=torch.bool)
    start = 0
    for n in sizes.tolist():  # 20% of every cluster held out, at least 2
        n_test = max(2, round(0.2 * n))
        pick = torch.randperm(n, generator=g)[:n_test] + start
        test[pick] = True
        start += n
    train_sizes = torch.bincount(labels[~test], minlength=cfg.clusters)
    order = torch.argsort(train_sizes, descending=True, stable=True)
    tercile = torch.empty(cfg.clusters, dtype=torch.long)
    tercile[order] = torch.arange(cfg.clusters) * 3 // cfg.clusters
    return Data(x[~test], y[~test], labels[~test], x[test], y[test], labels[test], train_sizes, tercile)


# ---------------------------------------------------------------------------------------------------------------
# Model and training

def tower(cfg: Config) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(cfg.feature_dim, cfg.hidden), torch.nn.GELU(),
                               torch.nn.Linear(cfg.hidden, cfg.hidden), torch.nn.GELU(),
                               torch.nn.Linear(cfg.hidden, cfg.embed_dim))


def schedule_value(method: str, cfg: Config, step: int, sample_sizes: torch.Tensor):
    """The temperature (InfoNCE methods) or margin (max-margin methods) at ``step``: a float or an [N] tensor.

    ``sample_sizes`` holds the training-set cluster size of every training sample; MM-TS is evaluated on all of
    them so that its shift is normalized over the whole training set, then indexed by the batch.
    """
    if method == "fixed-tau":
        return cfg.tau
    if method == "TS":
        return mk.schedules.cosine_temperature(step, cfg.ts_min, cfg.ts_max, cfg.period)
    if method == "MM-TS":
        return mk.schedules.mmts_temperature(step, cfg.period, sample_sizes, cfg.mmts_alpha, *cfg.mmts_shift)
    if method == "max-margin":
        return cfg.margin
    if method == "MM-TS-mm":
        return mk.schedules.mmts_temperature(step, cfg.period, sample_sizes, cfg.mm_alpha, *cfg.mm_shift)
    raise ValueError(f"unknown method {method!r}")


def train(method: str, cfg: Config, data: Data, init: Dict[str, dict], batches: torch.Tensor, bar=None):
    fx, fy = tower(cfg), tower(cfg)
    fx.load_state_dict(init["x"])
    fy.load_state_dict(init["y"])
    opt = torch.optim.Adam(list(fx.parameters()) + list(fy.parameters()), lr=cfg.lr)
    sample_sizes = data.cluster_sizes[data.c_train]
    for step in range(cfg.steps):
        idx = batches[step]
        ex = F.normalize(fx(data.x_train[idx]), dim=1)
        ey = F.normalize(fy(data.y_train[idx]), dim=1)
        value = schedule_value(method, cfg, step, sample_sizes)
        if isinstance(value, torch.Tensor):
            value = value[idx]
        if method in ("max-margin", "MM-TS-mm"):
            loss = mk.max_margin(ex, ey, margin=value, backend="auto")
        else:
            loss = mk.info_nce(ex, ey, temperature=value, backend="auto")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if bar is not None and (step + 1) % 50 == 0:
            bar.update(50)
    if bar is not None:
        bar.update(cfg.steps % 50)
    return fx, fy


@torch.no_grad()
def evaluate(fx, fy, data: Data) -> Dict[str, float]:
    """R@K per tercile (both directions averaged) and the cluster-level mAP, on the held-out pairs."""
    ex = F.normalize(fx(data.x_test), dim=1)
    ey = F.normalize(fy(data.y_test), dim=1)
    rank_xy, rank_yx = metrics.ranks(ex, ey), metrics.ranks(ey, ex)
    groups = {"overall": torch.ones_like(data.c_test, dtype=torch.bool)}
    for t, name in enumerate(TERCILES[1:]):
        groups[name] = data.tercile[data.c_test] == t
    out = {}
    for name, mask in groups.items():
        for k in KS:
            out[f"{name} R@{k}"] = 0.5 * (metrics.recall_at_k(rank_xy[mask], k) + metrics.recall_at_k(rank_yx[mask], k))
    maps = [metrics.map_ndcg(q, c, query_classes=data.c_test, candidate_classes=data.c_test)["mAP"]
            for q, c in ((ex, ey), (ey, ex))]
    out["cluster mAP"] = 0.5 * sum(maps)
    return out


def run(cfg: Config, show_progress: bool = True):
    """Every method on every seed: {method: [result dict per seed]}, and the schedule traces for the plot."""
    results = {m: [] for m in METHODS}
    bar = progress(cfg.seeds * len(METHODS) * cfg.steps, "longtail", enabled=show_progress)
    data = None
    for seed in range(cfg.seeds):
        data = make_data(cfg, seed)
        torch.manual_seed(seed)
        init = {"x": copy.deepcopy(tower(cfg).state_dict()), "y": copy.deepcopy(tower(cfg).state_dict())}
        g = torch.Generator().manual_seed(20_000 + seed)
        n = len(data.c_train)
        batches = torch.stack([torch.randperm(n, generator=g)[:cfg.batch] for _ in range(cfg.steps)])
        for method in METHODS:
            bar.set_postfix_str(f"seed {seed} {method}")
            fx, fy = train(method, cfg, data, init, batches, bar)
            results[method].append(evaluate(fx, fy, data))
    bar.close()
    return results, traces(cfg, data)


def traces(cfg: Config, data: Data) -> Dict[str, List[float]]:
    """τ and margins over the steps, for the largest (head) and smallest (tail) cluster of the last seed's data."""
    sizes = data.cluster_sizes[data.c_train]
    head, tail = int(sizes.argmax()), int(sizes.argmin())
    out = {k: [] for k in ("fixed τ", "TS τ", "MM-TS τ (head sample)", "MM-TS τ (tail sample)",
                           "fixed margin", "MM-TS margin (head sample)", "MM-TS margin (tail sample)")}
    for step in range(cfg.steps):
        out["fixed τ"].append(cfg.tau)
        out["TS τ"].append(schedule_value("TS", cfg, step, sizes))
        tau = schedule_value("MM-TS", cfg, step, sizes)
        out["MM-TS τ (head sample)"].append(float(tau[head]))
        out["MM-TS τ (tail sample)"].append(float(tau[tail]))
        out["fixed margin"].append(cfg.margin)
        m = schedule_value("MM-TS-mm", cfg, step, sizes)
        out["MM-TS margin (head sample)"].append(float(m[head]))
        out["MM-TS margin (tail sample)"].append(float(m[tail]))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Report

def mean_std(values: List[float]):
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), (float(t.std()) if len(values) > 1 else 0.0)


def table(results) -> List[str]:
    cols = [f"{g} R@{k}" for g in TERCILES for k in KS] + ["cluster mAP"]
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for m in METHODS:
        cells = []
        for c in cols:
            mu, sd = mean_std([r[c] for r in results[m]])
            cells.append(f"{100 * mu:.1f} ± {100 * sd:.1f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


PAIRS = (("TS", "fixed-tau"), ("MM-TS", "fixed-tau"), ("MM-TS", "TS"), ("MM-TS-mm", "max-margin"))


def paired_table(results) -> List[str]:
    """Per-seed differences (same data, init and batches), in recall points: mean ± std over seeds."""
    cols = [f"{g} R@{k}" for g in TERCILES for k in (1, 10)]
    lines = ["| comparison | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for a, b in PAIRS:
        cells = []
        for c in cols:
            mu, sd = mean_std([ra[c] - rb[c] for ra, rb in zip(results[a], results[b])])
            cells.append(f"{100 * mu:+.1f} ± {100 * sd:.1f}")
        lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    return lines


def plot(results, trace, cfg: Config, path: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[plot]'): no plot"
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    steps = range(cfg.steps)
    for key, color in (("fixed τ", "C0"), ("TS τ", "C1"), ("MM-TS τ (head sample)", "C2"),
                       ("MM-TS τ (tail sample)", "C3")):
        axes[0, 0].plot(steps, trace[key], label=key, color=color)
    for key, color in (("fixed margin", "C0"), ("MM-TS margin (head sample)", "C2"),
                       ("MM-TS margin (tail sample)", "C3")):
        axes[0, 1].plot(steps, trace[key], label=key, color=color)
    axes[0, 0].set_title("temperature over training steps")
    axes[0, 1].set_title("max-margin: margin over training steps")
    for ax in axes[0]:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    width = 0.8 / len(METHODS)
    for ax, k in zip(axes[1], (1, 10)):
        for i, m in enumerate(METHODS):
            stats = [mean_std([r[f"{g} R@{k}"] for r in results[m]]) for g in TERCILES]
            ax.bar([j + (i - (len(METHODS) - 1) / 2) * width for j in range(len(TERCILES))],
                   [100 * s[0] for s in stats], width, yerr=[100 * s[1] for s in stats], capsize=2, label=m)
        ax.set_xticks(range(len(TERCILES)), TERCILES)
        ax.set_ylabel(f"R@{k} (%)")
        ax.set_title(f"held-out R@{k} per cluster-frequency tercile (mean ± std over {cfg.seeds} seeds)")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def mmts_shift_note(cfg: Config) -> str:
    """How MM-TS's per-sample shift sits against the fixed / TS centre (a fairness fact worth stating)."""
    data = make_data(cfg, 0)
    shift = mk.schedules.cluster_shift(data.cluster_sizes[data.c_train], *cfg.mmts_shift)
    return (f"mean over training samples {float(shift.mean()):.4f} (seed 0; head cluster {float(shift.max()):.2f}, "
            f"smallest cluster {float(shift.min()):.2f}) against the fixed / TS centre {cfg.tau}")


def write_markdown(path: str, results, cfg: Config, meta: Dict[str, str], png: str = None) -> None:
    sizes = zipf_sizes(cfg)
    lines = [f"# Long-tail retrieval experiment ({meta['date']})", ""]
    lines += [f"- **{k}**: {v}" for k, v in meta.items()]
    lines += [f"- **MM-TS shift**: {mmts_shift_note(cfg)}",
              f"- **config**: `{asdict(cfg)}`",
              f"- **clusters**: {cfg.clusters}, Zipf s = {cfg.zipf}: largest {int(sizes.max())} pairs, smallest "
              f"{int(sizes.min())} (before the 80/20 split)", ""]
    lines += ["R@K in %, on held-out pairs, x→y and y→x averaged; head / middle / tail: the queries whose cluster "
              "is in the first / second / last third of the clusters ranked by training size. Cluster mAP: "
              "relevance = same cluster. Mean ± std over seeds.", ""]
    lines += table(results)
    lines += ["", "Paired differences (same seed: same data, initial weights and batches), recall points, mean ± std "
              "over seeds:", ""]
    lines += paired_table(results)
    if png:
        lines += ["", f"![schedules and recall per tercile]({os.path.basename(png)})"]
    lines += ["", "## Setup", "", __doc__.split("\n\n", 1)[1].strip()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _auto_backend_name(device: torch.device) -> str:
    module = mk.backends.resolve("auto", device).__name__
    names = {v: k for k, v in getattr(mk.backends, "_MODULES", {}).items()}
    return names.get(module, module)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.longtail", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smaller run: 30 clusters, 400 steps, 3 seeds")
    p.add_argument("--seeds", type=int, help="number of seeds (0 … n−1)")
    p.add_argument("--steps", type=int)
    p.add_argument("--samples", type=int, help="pairs before the per-cluster minimum")
    p.add_argument("--clusters", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--out-dir", default=DEFAULT_OUT)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default 1: the towers are small, and one thread per process is "
                        "much faster than a contended thread pool on a shared machine)")
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    overrides = {k: getattr(args, k) for k in ("seeds", "steps", "samples", "clusters", "batch")
                 if getattr(args, k) is not None}
    for k, v in overrides.items():
        if v < (1 if k != "clusters" else 3):
            p.error(f"--{k} is too small: {v}")
    if "batch" in overrides and overrides["batch"] < 2:
        p.error("--batch must be >= 2")
    return args, replace(cfg, **overrides)


def main(argv=None) -> None:
    args, cfg = parse_args(argv)
    if args.threads < 1:
        raise SystemExit("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results, trace = run(cfg, show_progress=not args.no_progress)
    elapsed = time.perf_counter() - start
    date = datetime.date.today().isoformat()
    stem = os.path.join(os.path.abspath(args.out_dir), f"longtail-{date}" + ("-quick" if args.quick else ""))
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    probe = torch.zeros(2, 2)
    meta = {
        "command": ("python -m bench.longtail " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None
                                                                                     else argv))).rstrip(),
        "date": date, "seeds": ", ".join(str(s) for s in range(cfg.seeds)),
        "loss backend (auto on CPU)": _auto_backend_name(probe.device),
        "torch": torch.__version__, "python": platform.python_version(), "threads": str(torch.get_num_threads()),
        "run time": f"{elapsed:.0f} s",
    }
    print("\n".join(table(results) + [""] + paired_table(results)))
    png = None
    if not args.no_plot:
        why = plot(results, trace, cfg, stem + ".png")
        if why:
            print(f"plot skipped: {why}")
        else:
            png = stem + ".png"
    write_markdown(stem + ".md", results, cfg, meta, png)
    print(f"run time {elapsed:.0f} s; wrote {stem}.md" + (f", {png}" if png else ""))


if __name__ == "__main__":
    main()
