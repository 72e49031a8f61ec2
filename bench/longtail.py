"""`python -m bench.longtail`: can a per-sample temperature (or margin) tied to the size of a sample's semantic
cluster (MM-TS) be credited with better long-tail retrieval — and is the credit due to tying it to cluster size?

PRIMARY METRIC (declared before any run, printed by every run): test nDCG over all queries (class-balanced gallery,
x→y and y→x averaged), and the primary contrast MM-TS − TS (InfoNCE). The attribution is read from the controls:
MM-TS − (TS re-centred at MM-TS's mean τ), MM-TS − (MM-TS with its mean shift: no per-sample spread),
MM-TS − (MM-TS, shifts shuffled), MM-TS − (MM-TS, reversed). Every other metric, group and contrast is secondary,
among them the label row: MM-TS whose loss also gets the cluster ids as labels, same-cluster columns ignored
(false-negative elimination), against MM-TS and against itself with the labels permuted across training samples.

Data, metrics: `bench.longtail_data` (head clusters full of near-duplicates, i.e. false negatives; class-balanced
validation / test splits with EK-100-style graded relevance). Schedules, controls, training: `bench.longtail_methods`.
Statistics: `bench.longtail_stats` (paired differences over seeds, 95% t-intervals).

Protocol
  1. Tuning, the same budget for every tuned method: a grid of GRID_SIZE settings (τ for fixed τ, [τ_min, τ_max]
     for TS, α and the shift range for MM-TS and the label row; the same for margins), each trained on the tuning
     seeds (data worlds 1000, 1001, … — never the evaluation seeds) and scored by the primary metric on their
     *validation* split; the best mean wins. The controls take their row's tuned setting and are not tuned.
  2. Evaluation: every row on evaluation seeds 0 … S−1 (for a seed, every row shares the data, the initial weights
     and the batch order), scored on the *test* split; paired differences with 95% t-intervals.
  3. Dose–response (InfoNCE): for Zipf exponents s and shift-range widths w (fractions of the widest range that
     keeps τ ≥ 0.01 around the tuned MM-TS's centre, tuned α), MM-TS − TS (tuned), MM-TS − mean shift and
     MM-TS − shuffled on the primary metric. If the mechanism is real, the gaps grow with w and s.

Results never overwrite anything: the default output is a new time-stamped file under build/longtail/ (git-ignored);
`--out PATH` names the file (it must not exist). The file records the command, CPU, date, wall time and load.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from typing import Dict, List, Tuple

import torch

from .longtail_data import GROUPS, METRICS, DataConfig, evaluate, make_data
from .longtail_methods import (TAU_FLOOR, Schedule, TrainConfig, default_backend, mean_shift, mean_value,
                               recentred_at, train)
from .longtail_stats import paired_interval
from .progress import progress
from .report import device_name

PRIMARY = "overall nDCG"
PRIMARY_CONTRAST = ("MM-TS", "TS")
GRID_SIZE = 6
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tuned rows: (loss, grid). Every grid has GRID_SIZE settings: the same tuning budget per method. The MM-TS grids
# hold the official settings (argparse default α = 0.08, sh ∈ [0.05, 0.20]; EK-100 α = 0.2, sh ∈ [0.17, 0.30]) and
# cover mean values (≈ sh_min + 0.35·(sh_max − sh_min) over the training samples here) like the other grids.
TUNED: Dict[str, Tuple[str, List[Schedule]]] = {
    "fixed τ": ("infonce", [Schedule("fixed", (v,)) for v in (0.05, 0.1, 0.15, 0.2, 0.3, 0.5)]),
    "TS": ("infonce", [Schedule("cosine", p) for p in ((0.05, 0.15), (0.1, 0.2), (0.1, 0.3), (0.2, 0.4),
                                                       (0.05, 0.3), (0.1, 1.0))]),
    "MM-TS": ("infonce", [Schedule("mmts", p) for p in ((0.08, 0.05, 0.20), (0.2, 0.17, 0.30), (0.04, 0.08, 0.30),
                                                        (0.1, 0.1, 0.3), (0.04, 0.15, 0.40), (0.08, 0.05, 0.35))]),
    "fixed m": ("max_margin", [Schedule("fixed", (v,)) for v in (0.1, 0.2, 0.3, 0.4, 0.6, 0.8)]),
    "cosine m": ("max_margin", [Schedule("cosine", p) for p in ((0.1, 0.3), (0.2, 0.4), (0.3, 0.5), (0.1, 0.6),
                                                                (0.2, 0.8), (0.4, 0.6))]),
    "MM-TS m": ("max_margin", [Schedule("mmts", p) for p in ((0.08, 0.05, 0.20), (0.2, 0.17, 0.30), (0.2, 0.2, 0.5),
                                                             (0.1, 0.3, 0.6), (0.08, 0.1, 0.6), (0.2, 0.3, 0.8))]),
}
# The label row is MM-TS with a loss that ignores same-cluster columns; it gets MM-TS's grid (its best τ may differ
# once the false negatives are out of the denominators) and the same tuning budget.
LABEL_ROW = "MM-TS, same-cluster ignored"
TUNED[LABEL_ROW] = ("infonce", [replace(s, same_label="ignore") for s in TUNED["MM-TS"][1]])
# Controls: (the tuned MM-TS row they ablate, what they change; see bench.longtail_methods).
CONTROLS: Dict[str, Tuple[str, str]] = {
    "TS re-centred at MM-TS's mean τ": ("MM-TS", "re-centred"),
    "MM-TS, mean shift (no spread)": ("MM-TS", "mean shift"),
    "MM-TS, shifts shuffled": ("MM-TS", "shuffled"),
    "MM-TS, reversed": ("MM-TS", "reversed"),
    "cosine m re-centred at MM-TS m's mean": ("MM-TS m", "re-centred"),
    "MM-TS m, mean shift (no spread)": ("MM-TS m", "mean shift"),
    "MM-TS m, shifts shuffled": ("MM-TS m", "shuffled"),
    "MM-TS m, reversed": ("MM-TS m", "reversed"),
    LABEL_ROW + ", labels permuted": (LABEL_ROW, "labels permuted"),
}
COSINE_OF = {"MM-TS": "TS", "MM-TS m": "cosine m"}  # the tuned cosine row a "re-centred" control moves
LABEL_CONTROL = LABEL_ROW + ", labels permuted"
ROWS = ("fixed τ", "TS", "MM-TS") + tuple(k for k in CONTROLS if CONTROLS[k][0] == "MM-TS") + (
    "fixed m", "cosine m", "MM-TS m") + tuple(k for k in CONTROLS if CONTROLS[k][0] == "MM-TS m") + (
    LABEL_ROW, LABEL_CONTROL)


def _contrasts(mm: str, cos: str, fixed: str) -> Tuple[Tuple[str, str], ...]:
    controls = tuple(k for k in CONTROLS if CONTROLS[k][0] == mm)
    return ((mm, cos),) + tuple((mm, c) for c in controls) + ((controls[0], cos), (mm, fixed), (cos, fixed))


# The label row: what the labels add to MM-TS, how much of it needs the cluster structure (against the permuted
# labels), and what dropping as many random columns does.
COMPARISONS = _contrasts("MM-TS", "TS", "fixed τ") + _contrasts("MM-TS m", "cosine m", "fixed m") + (
    (LABEL_ROW, "MM-TS"), (LABEL_ROW, LABEL_CONTROL), (LABEL_CONTROL, "MM-TS"))
COLUMNS = (PRIMARY, "head nDCG", "middle nDCG", "tail nDCG", "overall mAP", "overall R@1", "overall R@10",
           "tail R@1")


@dataclass(frozen=True)
class Experiment:
    data: DataConfig = DataConfig(clusters=60, noise=0.8, within=0.6)
    train: TrainConfig = TrainConfig()
    seeds: int = 10
    tuning_seeds: int = 2
    dose_seeds: int = 10
    dose_zipf: Tuple[float, ...] = (0.5, 1.0, 1.5)
    dose_widths: Tuple[float, ...] = (0.25, 0.5, 1.0)

    def runs(self) -> int:
        tuning = GRID_SIZE * len(TUNED) * self.tuning_seeds
        dose = len(self.dose_zipf) * self.dose_seeds * (1 + 3 * len(self.dose_widths))
        return tuning + len(ROWS) * self.seeds + dose


FULL = Experiment()
QUICK = Experiment(data=replace(FULL.data, clusters=30, samples=3000), train=replace(FULL.train, steps=100),
                   tuning_seeds=1, dose_seeds=5, dose_zipf=(0.5, 1.5), dose_widths=(0.5, 1.0))


# ---------------------------------------------------------------------------------------------------------------
# Running

class Runner:
    """Trains and scores one (loss, schedule, data world, seed); caches the data worlds."""

    def __init__(self, exp: Experiment, bar):
        self.exp, self.bar, self._data, self._scores = exp, bar, {}, {}

    def data(self, cfg: DataConfig, seed: int):
        key = (cfg, seed)
        if key not in self._data:
            self._data = {key: make_data(cfg, seed)}  # one world at a time: the loops below are seed-major
        return self._data[key]

    def score(self, loss: str, sched: Schedule, cfg: DataConfig, seed: int, split: str) -> Dict[str, float]:
        key = (loss, sched, cfg, seed, split)
        if key in self._scores:  # e.g. the dose-response cell that is the main experiment's setting
            self.bar.update(1)
            return self._scores[key]
        data = self.data(cfg, seed)
        embed = train(loss, sched, data, self.exp.train, seed, self.bar)
        s = getattr(data, split)
        self._scores[key] = evaluate(*embed(s), s, data.tercile)
        return self._scores[key]


def tune(runner: Runner, exp: Experiment):
    """{row: chosen schedule}, and {row: [(schedule, mean validation primary metric)]} for the report."""
    seeds = [1000 + k for k in range(exp.tuning_seeds)]
    scores = {row: [] for row in TUNED}
    for seed in seeds:
        for row, (loss, grid) in TUNED.items():
            runner.bar.set_postfix_str(f"tuning {row} (seed {seed})")
            for i, sched in enumerate(grid):
                value = runner.score(loss, sched, exp.data, seed, "val")[PRIMARY]
                if len(scores[row]) <= i:
                    scores[row].append([sched, 0.0])
                scores[row][i][1] += value / len(seeds)
    chosen = {row: max(s, key=lambda p: p[1])[0] for row, s in scores.items()}  # first of equals wins
    return chosen, {row: [tuple(p) for p in s] for row, s in scores.items()}


def row_schedule(row: str, chosen: Dict[str, Schedule], sizes: torch.Tensor) -> Tuple[str, Schedule]:
    if row in TUNED:
        return TUNED[row][0], chosen[row]
    base, how = CONTROLS[row]
    sched = chosen[base]
    if how == "mean shift":
        sched = mean_shift(sched, sizes)
    elif how == "re-centred":
        sched = recentred_at(chosen[COSINE_OF[base]], mean_value(sched, sizes))
    elif how == "labels permuted":
        sched = replace(sched, labels="permuted")
    else:
        sched = replace(sched, assign=how)
    return TUNED[base][0], sched


def evaluate_rows(runner: Runner, exp: Experiment, chosen) -> Dict[str, List[Dict[str, float]]]:
    results = {row: [] for row in ROWS}
    for seed in range(exp.seeds):
        sizes = runner.data(exp.data, seed).train_sizes
        for row in ROWS:
            runner.bar.set_postfix_str(f"test seed {seed} {row}")
            loss, sched = row_schedule(row, chosen, sizes)
            results[row].append(runner.score(loss, sched, exp.data, seed, "test"))
    return results


def dose_schedules(mmts: Schedule, widths) -> List[Schedule]:
    """MM-TS with the tuned α and centre of the shift range, at fractions of the widest range with τ ≥ TAU_FLOOR."""
    alpha, lo, hi = mmts.params
    centre = 0.5 * (lo + hi)
    widest = 2 * (centre - alpha / 2 - TAU_FLOOR)
    return [Schedule("mmts", (alpha, centre - f * widest / 2, centre + f * widest / 2)) for f in widths]


def dose_response(runner: Runner, exp: Experiment, chosen) -> Dict[Tuple[float, int], Dict[str, List[float]]]:
    """{(zipf, width index): {"MM-TS" | "TS" | "mean shift" | "shuffled": [primary metric per seed]}}."""
    out = {}
    scheds = dose_schedules(chosen["MM-TS"], exp.dose_widths)
    for s in exp.dose_zipf:
        cfg = replace(exp.data, zipf=s)
        for seed in range(exp.dose_seeds):
            runner.bar.set_postfix_str(f"dose zipf {s} seed {seed}")
            sizes = runner.data(cfg, seed).train_sizes
            ts = runner.score("infonce", chosen["TS"], cfg, seed, "test")[PRIMARY]
            for w, sched in enumerate(scheds):
                cell = out.setdefault((s, w), {"MM-TS": [], "TS": [], "mean shift": [], "shuffled": []})
                cell["TS"].append(ts)
                for name, variant in (("MM-TS", sched), ("mean shift", mean_shift(sched, sizes)),
                                      ("shuffled", replace(sched, assign="shuffled"))):
                    cell[name].append(runner.score("infonce", variant, cfg, seed, "test")[PRIMARY])
    return out


# ---------------------------------------------------------------------------------------------------------------
# Report

def _pts(v: float) -> str:
    return f"{round(100 * v, 2) + 0.0:+.2f}"  # + 0.0: no "-0.00"


def _ci(iv) -> str:
    return f"{_pts(iv.mean)} [{_pts(iv.low)}, {_pts(iv.high)}]"


def primary_statement(exp: Experiment) -> str:
    a, b = PRIMARY_CONTRAST
    return (f"Primary metric (declared before any run): test {PRIMARY} (class-balanced gallery, x→y and y→x "
            f"averaged); primary contrast: {a} − {b}; {exp.seeds} paired seeds, 95% t-intervals. "
            "Everything else is secondary.")


def means_table(results) -> List[str]:
    lines = ["| method | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for row in ROWS:
        cells = [f"{100 * sum(r[c] for r in results[row]) / len(results[row]):.2f}" for c in COLUMNS]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def paired_table(results, columns=COLUMNS) -> List[str]:
    lines = ["| comparison | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for a, b in COMPARISONS:
        cells = [_ci(paired_interval([r[c] for r in results[a]], [r[c] for r in results[b]])) for c in columns]
        label = f"**{a} − {b}** (primary)" if (a, b) == PRIMARY_CONTRAST else f"{a} − {b}"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def tuning_table(scores, chosen) -> List[str]:
    lines = ["| method | setting: mean validation " + PRIMARY + " (%) | chosen |", "|---|---|---|"]
    for row, pairs in scores.items():
        cells = ", ".join(f"{s.describe()}: {100 * v:.2f}" for s, v in pairs)
        lines.append(f"| {row} | {cells} | {chosen[row].describe()} |")
    return lines


def dose_table(dose, exp: Experiment, chosen) -> List[str]:
    scheds = dose_schedules(chosen["MM-TS"], exp.dose_widths)
    lines = [f"| Zipf s | shift range (α = {chosen['MM-TS'].params[0]:g}) | MM-TS − TS | MM-TS − mean shift | "
             "MM-TS − shuffled |", "|---|---|---|---|---|"]
    for (s, w), cell in sorted(dose.items()):
        lo, hi = scheds[w].params[1:]
        gaps = [_ci(paired_interval(cell["MM-TS"], cell[b])) for b in ("TS", "mean shift", "shuffled")]
        lines.append(f"| {s:g} | [{lo:.3f}, {hi:.3f}] | " + " | ".join(gaps) + " |")
    return lines


def report(exp, meta, chosen, scores, results, dose) -> str:
    lines = [f"# Long-tail retrieval experiment ({meta['date']})", ""]
    lines += [f"- **{k}**: {v}" for k, v in meta.items()]
    lines += ["", primary_statement(exp), "", "## Paired differences on the test split", "",
              f"Percentage points, mean over {exp.seeds} seeds [95% t-interval]; the first column is the primary "
              "metric, the rest are secondary.", ""]
    lines += paired_table(results)
    lines += ["", "## Means on the test split (%)", ""] + means_table(results)
    lines += ["", f"## Dose–response ({PRIMARY}, InfoNCE, {exp.dose_seeds} paired seeds, 95% t-intervals)", ""]
    lines += dose_table(dose, exp, chosen)
    lines += ["", f"## Tuning ({GRID_SIZE} settings per method, {exp.tuning_seeds} tuning seed(s), validation split)",
              ""] + tuning_table(scores, chosen)
    lines += ["", "## Configuration", "", f"`{dataclasses.asdict(exp)}`", "", "## Setup", "", __doc__.strip()]
    for module in ("longtail_data", "longtail_methods", "longtail_stats"):
        lines += ["", sys.modules[f"{__package__}.{module}"].__doc__.strip()]
    return "\n".join(lines) + "\n"


def raw_results(exp, chosen, scores, results, dose) -> dict:
    return {"experiment": dataclasses.asdict(exp), "chosen": {k: dataclasses.asdict(v) for k, v in chosen.items()},
            "tuning": {k: [[dataclasses.asdict(s), v] for s, v in p] for k, p in scores.items()},
            "test": results,
            "dose": [{"zipf": s, "width": exp.dose_widths[w], **cell} for (s, w), cell in sorted(dose.items())]}


# ---------------------------------------------------------------------------------------------------------------
# Command line

def default_out(quick: bool) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return os.path.join(REPO, "build", "longtail", f"longtail-{stamp}" + ("-quick" if quick else "") + ".md")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.longtail", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="30 clusters, 100 steps, 1 tuning seed, a smaller sweep (about 2 minutes on one core)")
    p.add_argument("--seeds", type=int, help="evaluation seeds (0 … n−1), at least 2")
    p.add_argument("--tuning-seeds", type=int)
    p.add_argument("--dose-seeds", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--clusters", type=int)
    p.add_argument("--samples", type=int, help="training pairs before the per-cluster minimum")
    p.add_argument("--out", help="the results file (.md; a .json of the raw numbers goes beside it); it must not "
                                 "exist. Default: a new time-stamped file under build/longtail/")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: small towers, shared "
                                                          "machines)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    exp = QUICK if args.quick else FULL
    for name, low in (("seeds", 2), ("tuning_seeds", 1), ("dose_seeds", 2), ("steps", 1), ("clusters", 3),
                      ("samples", 1), ("threads", 1)):
        v = getattr(args, name)
        if v is not None and v < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {v}")
    exp = replace(exp, **{k: getattr(args, k) for k in ("seeds", "tuning_seeds", "dose_seeds")
                          if getattr(args, k) is not None})
    if args.steps is not None:
        exp = replace(exp, train=replace(exp.train, steps=args.steps))
    exp = replace(exp, data=replace(exp.data, **{k: getattr(args, k) for k in ("clusters", "samples")
                                                 if getattr(args, k) is not None}))
    exp = replace(exp, train=replace(exp.train, backend=default_backend()))
    out = os.path.abspath(args.out or default_out(args.quick))
    if not out.endswith(".md"):
        p.error(f"--out must end in .md, got {args.out}")
    for path in (out, out[:-3] + ".json"):
        if os.path.exists(path):
            p.error(f"{path} exists: results are never overwritten, choose a new --out")
    return args, exp, out


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv=None) -> None:
    args, exp, out = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(primary_statement(exp), flush=True)
    # Everything the report needs that could fail is gathered before the long part.
    cpu, commit = f"{device_name(torch.device('cpu'))} ({os.cpu_count()} logical cores)", _git_commit()
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    bar = progress(exp.runs(), "longtail runs", enabled=not args.no_progress)
    runner = Runner(exp, bar)
    chosen, scores = tune(runner, exp)
    results = evaluate_rows(runner, exp, chosen)
    dose = dose_response(runner, exp, chosen)
    bar.close()
    wall = time.perf_counter() - t0
    command = "python -m bench.longtail " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None
                                                                               else argv))
    meta = {
        "command": f"`{command.rstrip()}`", "date": started.date().isoformat(),
        "started (UTC)": started.strftime("%Y-%m-%d %H:%M:%S"), "wall time": f"{wall:.0f} s",
        "CPU": cpu, "threads": str(torch.get_num_threads()),
        "load average at start / end (1 min)": f"{load_start[0]:.2f} / {os.getloadavg()[0]:.2f} (shared machine: "
                                               "load above the thread count means contention)",
        "loss backend": exp.train.backend, "git commit": commit, "torch": torch.__version__,
        "python": platform.python_version(), "runs": str(exp.runs()),
    }
    text = report(exp, meta, chosen, scores, results, dose)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "x") as f:  # "x": never overwrite
        f.write(text)
    with open(out[:-3] + ".json", "x") as f:
        json.dump(raw_results(exp, chosen, scores, results, dose), f, indent=1)
    print("\n".join(["", primary_statement(exp), ""] + paired_table(results) + [""] + dose_table(dose, exp, chosen)))
    print(f"\nwall time {wall:.0f} s; wrote {out} and {out[:-3]}.json")


if __name__ == "__main__":
    main()
