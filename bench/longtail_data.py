"""Synthetic long-tailed paired data in which head clusters hold semantically equivalent samples (false negatives
for InfoNCE), with class-balanced validation and test galleries, graded relevance and the evaluation.

Generative model (two modalities seeing one latent per sample):

    cluster sizes    n_c ∝ c^(−s), c = 1 … K (Zipf exponent s; at least `min_cluster`): the *training* sizes
    instances        cluster c has m_c = max(P, round(n_c^β)) instances ("captions"), with latents
                     ν_{c,u} = μ_c + σ_w·ε_{c,u},  μ_c = spread · (random unit vector)
    samples          a sample of instance (c, u) has z = ν_{c,u} + σ_d·δ   (σ_d ≪ σ_w: near-duplicates)
    modalities       x = tanh(A z) + σ_n·ξ,  y = tanh(B z) + σ_n·ξ'   (A, B fixed random maps, ξ, ξ' noise)

A training sample picks its instance uniformly within its cluster, so an instance of cluster c has about
n_c^(1−β) copies: a head-cluster sample meets semantically equivalent samples in most batches (false negatives that
InfoNCE pushes away), a tail sample almost never. This is the situation MM-TS's higher head temperature is for.

Validation and test splits: for every cluster, P of its instances and R fresh samples of each (default 3 × 2), so
every cluster has the same number of queries, every query faces the same gallery and the same number of relevant
items whatever the size of its cluster (class-balanced: head and tail numbers are comparable).

Relevance, in the EK-100 form of `mk.metrics.class_overlap_relevance` with the two fields (cluster, instance):
1 for the same instance, ½ for the same cluster, 0 otherwise.

Metrics on a split (x → y and y → x, averaged): nDCG and mAP (`mk.metrics.map_ndcg`; mAP counts relevance 1 as
relevant), and instance R@1 / R@10 (the query's own partner is the positive, `mk.metrics.ranks`); overall and for
the queries of the head / middle / tail thirds of the clusters ranked by training size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F

from mmts_kernels import metrics

GROUPS = ("overall", "head", "middle", "tail")
METRICS = ("nDCG", "mAP", "R@1", "R@10")


@dataclass(frozen=True)
class DataConfig:
    clusters: int = 40
    samples: int = 6000         # training pairs before the per-cluster minimum
    zipf: float = 1.0
    min_cluster: int = 8
    dup_exponent: float = 0.5   # β: instances per cluster m_c = max(P, round(n_c^β))
    latent_dim: int = 16
    spread: float = 2.0         # norm of the cluster centres μ_c
    within: float = 0.5         # σ_w: instance latents around their cluster centre
    duplicate: float = 0.05     # σ_d: samples around their instance latent
    noise: float = 0.5          # σ_n on each modality's features
    feature_dim: int = 64
    eval_instances: int = 3     # P: instances per cluster in the validation and test splits
    eval_repeats: int = 2       # R: samples of each of them


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor
    cluster: torch.Tensor       # [n] cluster of each pair
    instance: torch.Tensor      # [n] global instance id of each pair


@dataclass
class Data:
    train: Split
    val: Split
    test: Split
    cluster_sizes: torch.Tensor  # [K] training size of each cluster
    tercile: torch.Tensor        # [K] 0 head, 1 middle, 2 tail (clusters ranked by training size)

    @property
    def train_sizes(self) -> torch.Tensor:
        """[N_train] the training size of every training sample's cluster (n_c of MM-TS)."""
        return self.cluster_sizes[self.train.cluster]


def zipf_sizes(cfg: DataConfig) -> torch.Tensor:
    w = torch.arange(1, cfg.clusters + 1, dtype=torch.float64) ** (-cfg.zipf)
    return torch.clamp((cfg.samples * w / w.sum()).round().long(), min=cfg.min_cluster)


def instances_per_cluster(cfg: DataConfig, sizes: torch.Tensor) -> torch.Tensor:
    m = (sizes.double() ** cfg.dup_exponent).round().long()
    return torch.clamp(m, min=cfg.eval_instances)


def make_data(cfg: DataConfig, seed: int) -> Data:
    g = torch.Generator().manual_seed(10_000 + seed)
    sizes = zipf_sizes(cfg)
    m = instances_per_cluster(cfg, sizes)
    first = torch.cumsum(m, 0) - m  # global id of each cluster's first instance
    centres = cfg.spread * F.normalize(torch.randn(cfg.clusters, cfg.latent_dim, generator=g), dim=1)
    inst_cluster = torch.repeat_interleave(torch.arange(cfg.clusters), m)
    inst_latent = centres[inst_cluster] + cfg.within * torch.randn(len(inst_cluster), cfg.latent_dim, generator=g)
    maps = [torch.randn(cfg.latent_dim, cfg.feature_dim, generator=g) / math.sqrt(cfg.latent_dim)
            for _ in range(2)]

    def split(instance: torch.Tensor) -> Split:
        z = inst_latent[instance] + cfg.duplicate * torch.randn(len(instance), cfg.latent_dim, generator=g)
        x = torch.tanh(z @ maps[0]) + cfg.noise * torch.randn(len(instance), cfg.feature_dim, generator=g)
        y = torch.tanh(z @ maps[1]) + cfg.noise * torch.randn(len(instance), cfg.feature_dim, generator=g)
        return Split(x, y, inst_cluster[instance], instance)

    train_cluster = torch.repeat_interleave(torch.arange(cfg.clusters), sizes)
    train = split(first[train_cluster] + (torch.rand(len(train_cluster), generator=g) * m[train_cluster]).long())

    def balanced() -> Split:
        picks = [first[c] + torch.randperm(int(m[c]), generator=g)[:cfg.eval_instances]
                 for c in range(cfg.clusters)]
        return split(torch.cat(picks).repeat_interleave(cfg.eval_repeats))

    val, test = balanced(), balanced()
    order = torch.argsort(sizes, descending=True, stable=True)
    tercile = torch.empty(cfg.clusters, dtype=torch.long)
    tercile[order] = torch.arange(cfg.clusters) * 3 // cfg.clusters
    return Data(train, val, test, sizes, tercile)


@torch.no_grad()
def evaluate(ex: torch.Tensor, ey: torch.Tensor, split: Split, tercile: torch.Tensor) -> Dict[str, float]:
    """``{"<group> <metric>": value}`` for GROUPS × METRICS on embedded pairs (ex[i], ey[i]) of ``split``."""
    groups = {"overall": torch.ones_like(split.cluster, dtype=torch.bool)}
    for t, name in enumerate(GROUPS[1:]):
        groups[name] = tercile[split.cluster] == t
    classes = (split.cluster, split.instance)
    out = {f"{g} {k}": 0.0 for g in GROUPS for k in METRICS}
    for q, c in ((ex, ey), (ey, ex)):
        rank = metrics.ranks(q, c)
        for g, mask in groups.items():
            graded = metrics.map_ndcg(q[mask], c, query_classes=(split.cluster[mask], split.instance[mask]),
                                      candidate_classes=classes)
            out[f"{g} nDCG"] += 0.5 * graded["nDCG"]
            out[f"{g} mAP"] += 0.5 * graded["mAP"]
            out[f"{g} R@1"] += 0.5 * metrics.recall_at_k(rank[mask], 1)
            out[f"{g} R@10"] += 0.5 * metrics.recall_at_k(rank[mask], 10)
    return out
