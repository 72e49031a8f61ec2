"""The methods of the long-tail experiment — temperature (InfoNCE) and margin (max-margin) schedules and their
controls — and the training loop they share.

Every schedule is evaluated with `mk.schedules` (the one reference implementation), T = steps / oscillations:

    fixed        v(t) = v
    cosine (TS)  v(t) = cosine_temperature(t, lo, hi, T)
    MM-TS        v_i(t) = mmts_temperature(t, T, n_i, α, sh_min, sh_max)     n_i: training size of i's cluster

Controls keep MM-TS's tuned (α, sh_min, sh_max) and change one thing each:

    mean shift   the cosine schedule with MM-TS's amplitude around MM-TS's mean shift over the training samples,
                 lo/hi = mean_i sh(n_i) ∓ α/2: the same mean τ and oscillation, no per-sample spread
    re-centred   the *tuned TS* range moved so that its mean equals MM-TS's mean τ, lo/hi = lo_TS/hi_TS + Δ
                 (lo kept ≥ TAU_FLOOR): TS's own amplitude at MM-TS's mean
    shuffled     n_i replaced by n_{π(i)} for a fixed random permutation π: the same multiset of per-sample
                 values, unrelated to cluster size
    reversed     n_i replaced by the size of the sample at the mirrored position of the size order: the same
                 multiset of values, but the smallest clusters get the largest ones (tail → higher τ)

Means are over the training samples and whole periods (the cosine terms average to zero): fixed v → v,
cosine → (lo + hi)/2, MM-TS → mean_i sh(n_i).

The max-margin rows use the same schedules as per-sample margins (DESIGN §5: MM-TS's margin is its τ value).

Label rows: the cluster assignment MM-TS takes its sizes from (`mk.clusters_from_labels` of the training clusters:
`Clusters.sizes` are MM-TS's n_i, `Clusters.labels` the batch's labels) also goes to the loss as
`labels=`, on top of the MM-TS schedule. With `same_label="ignore"` (false-negative elimination) row i's loss is

    L_i = −S_ii/τ_i + log Σ_{j : j = i or c_j ≠ c_i} exp(S_ij/τ_i)        c_j: cluster id of the batch's sample j

(and the same for the columns of the symmetric loss): a same-cluster sample is no longer pushed away. Its control:

    labels permuted   c_i replaced by c_{π(i)} for a fixed random permutation π of the training set: the same
                      label counts (so about as many columns leave each denominator), unrelated to the content
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F

import mmts_kernels as mk

from .longtail_data import Data

ASSIGNMENTS = ("size", "shuffled", "reversed")
SAME_LABEL = (None, "ignore", "positive")  # None: no labels passed to the loss
LABEL_ASSIGNMENTS = ("cluster", "permuted")
TAU_FLOOR = 0.01  # the lowest τ any schedule built here may reach


@dataclass(frozen=True)
class Schedule:
    kind: str                 # "fixed" | "cosine" | "mmts"
    params: Tuple[float, ...]  # fixed: (v,); cosine: (lo, hi); mmts: (α, sh_min, sh_max)
    assign: str = "size"       # mmts only: which cluster size each sample's value is computed from
    same_label: str | None = None  # label rows: the loss's same_label, the cluster ids passed as labels
    labels: str = "cluster"    # label rows: "cluster" (each sample's own cluster id) or "permuted" (the control)

    def __post_init__(self):
        arity = {"fixed": 1, "cosine": 2, "mmts": 3}
        if arity.get(self.kind) != len(self.params):
            raise ValueError(f"schedule {self.kind!r} needs {arity.get(self.kind)} params, got {self.params}")
        if self.assign not in ASSIGNMENTS or (self.assign != "size" and self.kind != "mmts"):
            raise ValueError(f"assign={self.assign!r} is not valid for a {self.kind!r} schedule")
        if self.same_label not in SAME_LABEL:
            raise ValueError(f"same_label must be one of {SAME_LABEL}, got {self.same_label!r}")
        if self.labels not in LABEL_ASSIGNMENTS or (self.labels != "cluster" and self.same_label is None):
            raise ValueError(f"labels={self.labels!r} is not valid with same_label={self.same_label!r}")

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"{self.params[0]:g}"
        if self.kind == "cosine":
            return f"[{self.params[0]:.3g}, {self.params[1]:.3g}]"
        a, lo, hi = self.params
        text = f"α={a:g}, sh∈[{lo:g}, {hi:g}]" + ("" if self.assign == "size" else f", {self.assign}")
        if self.same_label is not None:
            text += f", same cluster {self.same_label}" + ("" if self.labels == "cluster" else ", labels permuted")
        return text


def mean_value(s: Schedule, sizes: torch.Tensor) -> float:
    """The mean τ (or margin) over the training samples (``sizes``: their cluster sizes) and whole periods."""
    if s.kind == "fixed":
        return s.params[0]
    if s.kind == "cosine":
        return 0.5 * (s.params[0] + s.params[1])
    _, lo, hi = s.params
    return float(mk.schedules.cluster_shift(sizes, lo, hi, n_min=sizes.min(), n_max=sizes.max()).mean())


def mean_shift(mmts: Schedule, sizes: torch.Tensor) -> Schedule:
    """The cosine schedule with MM-TS's amplitude α around MM-TS's mean shift over the training samples."""
    centre, alpha = mean_value(mmts, sizes), mmts.params[0]
    return Schedule("cosine", (centre - alpha / 2, centre + alpha / 2))


def recentred_at(cosine: Schedule, mean: float) -> Schedule:
    """A cosine schedule moved so that its mean is ``mean`` (its low end kept at TAU_FLOOR or above)."""
    lo, hi = cosine.params
    delta = mean - 0.5 * (lo + hi)
    return Schedule("cosine", (max(lo + delta, TAU_FLOOR), hi + delta))


def assigned_sizes(assign: str, sizes: torch.Tensor, seed: int) -> torch.Tensor:
    """The cluster size each training sample's MM-TS value is computed from, for the control ``assign``."""
    if assign == "size":
        return sizes
    if assign == "shuffled":
        g = torch.Generator().manual_seed(30_000 + seed)
        return sizes[torch.randperm(len(sizes), generator=g)]
    if assign == "reversed":
        order = torch.argsort(sizes, stable=True)
        out = torch.empty_like(sizes)
        out[order] = sizes[order.flip(0)]
        return out
    raise ValueError(f"unknown assignment {assign!r}")


def batch_labels(s: Schedule, clusters: torch.Tensor, seed: int) -> torch.Tensor | None:
    """The [N_train] labels the loss gets under ``s`` (None: no labels), from the training cluster ids."""
    if s.same_label is None:
        return None
    labels = mk.clusters_from_labels(clusters).labels
    if s.labels == "permuted":
        g = torch.Generator().manual_seed(40_000 + seed)
        labels = labels[torch.randperm(len(labels), generator=g)]
    return labels


def schedule_value(s: Schedule, step: int, period: float, sizes: torch.Tensor):
    """τ or margin at ``step``: a float, or a [N_train] tensor for MM-TS (``sizes`` already assigned)."""
    if s.kind == "fixed":
        return s.params[0]
    if s.kind == "cosine":
        return mk.schedules.cosine_temperature(step, *s.params, period)
    # n_min / n_max of the whole training set (the assignments keep the multiset of sizes): batch-independent.
    return mk.schedules.mmts_temperature(step, period, sizes, *s.params, n_min=sizes.min(), n_max=sizes.max())


@dataclass(frozen=True)
class TrainConfig:
    hidden: int = 256
    embed_dim: int = 32
    steps: int = 400
    batch: int = 128
    lr: float = 2e-3
    oscillations: int = 5     # T = steps / oscillations (the MM-TS default)
    backend: str = "cpp"

    @property
    def period(self) -> float:
        return self.steps / self.oscillations


def tower(feature_dim: int, cfg: TrainConfig) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(feature_dim, cfg.hidden), torch.nn.GELU(),
                               torch.nn.Linear(cfg.hidden, cfg.embed_dim))


def train(loss: str, sched: Schedule, data: Data, cfg: TrainConfig, seed: int, bar=None):
    """Two towers trained with ``loss`` ("infonce" | "max_margin") under ``sched``; returns the embedding function.

    ``seed`` fixes the initial weights, the batch order and the controls' permutations, so methods run with the
    same seed are paired.
    """
    feature_dim = data.train.x.shape[1]
    torch.manual_seed(seed)
    fx, fy = tower(feature_dim, cfg), tower(feature_dim, cfg)
    opt = torch.optim.Adam(list(fx.parameters()) + list(fy.parameters()), lr=cfg.lr)
    sizes = assigned_sizes(sched.assign, data.train_sizes, seed)
    labels = batch_labels(sched, data.train.cluster, seed)
    g = torch.Generator().manual_seed(20_000 + seed)
    n = len(sizes)
    for step in range(cfg.steps):
        idx = torch.randperm(n, generator=g)[:cfg.batch]
        ex = F.normalize(fx(data.train.x[idx]), dim=1)
        ey = F.normalize(fy(data.train.y[idx]), dim=1)
        value = schedule_value(sched, step, cfg.period, sizes)
        if isinstance(value, torch.Tensor):
            value = value[idx]
        extra = {} if labels is None else {"labels": labels[idx], "same_label": sched.same_label}
        if loss == "infonce":
            out = mk.info_nce(ex, ey, temperature=value, backend=cfg.backend, **extra)
        else:
            out = mk.max_margin(ex, ey, margin=value, backend=cfg.backend, **extra)
        opt.zero_grad(set_to_none=True)
        out.backward()
        opt.step()
    if bar is not None:
        bar.update(1)

    @torch.no_grad()
    def embed(split):
        return F.normalize(fx(split.x), dim=1), F.normalize(fy(split.y), dim=1)

    return embed


def default_backend() -> str:
    """The fused CPU backend when it is built, else the torch reference (slower, same numbers)."""
    return "cpp" if mk.available_backends().get("cpp") is None else "torch"

