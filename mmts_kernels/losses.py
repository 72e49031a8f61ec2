"""Losses as O(N) functions of the statistics (DESIGN §4). Shared by every backend, and by the single-process and
distributed paths (``loss_from_problem``: a validated problem's statistics from a backend, then its loss).

With s = row direction and c = column direction (symmetric losses only), per anchor i:

    InfoNCE              L_i = lse_i − pos_i / τ⁺_i         τ⁺_i = τ_i, or τ(sg(pos_i)) under DySTreSS
    max-margin (all)     L_i = hinge_i                       Σ_{j≠t_i} relu(m_i + S_ij − pos_i)
    max-margin (hardest) L_i = relu(m_i + hard_i − pos_i)    VSE++ max_violation

The column direction uses the same τ⁺ and margin (pair j's per-sample values) and the column statistics.
Reductions, per head, then summed over heads:

    "none"  [2, N] for symmetric losses (row direction, column direction), [N] otherwise; [H, …] with a head axis
    "sum"   Σ of every per-anchor term
    "mean"  InfoNCE: ½(mean_i L^row_i + mean_j L^col_j) (or mean_i L_i one-directional)
            max-margin (all): Σ / number of (anchor, negative) terms = 2N(N−1) symmetric, N(M−1) otherwise
            hardest: Σ / number of anchors = 2N symmetric, N otherwise
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from .stats import Stats
from .temperature import DySTreSS

if TYPE_CHECKING:
    from .validation import Problem


def per_anchor_terms(
    stats: Stats,
    *,
    loss: str,
    hardest_negative: bool,
    tau: Optional[torch.Tensor],
    dystress: Optional[DySTreSS],
    margin: Optional[torch.Tensor],
    symmetric: bool,
) -> torch.Tensor:
    """Per-anchor loss terms, [H, 2, N] when symmetric else [H, N]."""
    pos = stats.pos
    if loss == "infonce":
        tau_pos = dystress(pos.detach()) if dystress is not None else tau.to(pos.dtype)
        row = stats.lse - pos / tau_pos
        col = stats.lse_c - pos / tau_pos if symmetric else None
    elif hardest_negative:
        m = margin.to(pos.dtype)
        row = torch.relu(m + stats.hard - pos)
        col = torch.relu(m + stats.hard_c - pos) if symmetric else None
    else:
        row, col = stats.hinge, (stats.hinge_c if symmetric else None)
    return torch.stack((row, col), dim=1) if symmetric else row


def mean_count(*, loss: str, hardest_negative: bool, anchors: int, num_cols: int) -> int:
    """The denominator of reduction="mean", per head: anchors (2N symmetric, N otherwise), times the M − 1
    negatives of each anchor for max-margin over all negatives. ½(mean_row + mean_col) == Σ / 2N for InfoNCE."""
    if loss == "max_margin" and not hardest_negative:
        return anchors * (num_cols - 1)
    return anchors


def reduce_terms(
    terms: torch.Tensor, *, loss: str, hardest_negative: bool, reduction: str, num_cols: int, has_heads: bool
) -> torch.Tensor:
    """Apply ``reduction`` to the [H, 2, N] / [H, N] per-anchor terms (see the module docstring)."""
    if reduction == "none":
        return terms if has_heads else terms.squeeze(0)
    per_head = terms.flatten(1).sum(1)
    if reduction == "mean":
        per_head = per_head / mean_count(loss=loss, hardest_negative=hardest_negative, anchors=terms[0].numel(),
                                         num_cols=num_cols)
    return per_head.sum()


def loss_from_problem(problem: Problem, impl) -> torch.Tensor:
    """Statistics from the backend, then the O(N) loss on top of them."""
    stats = impl.compute_stats(problem.x, problem.y, problem.tau, problem.margin, problem.targets, problem.request)
    terms = per_anchor_terms(
        stats, loss=problem.loss, hardest_negative=problem.hardest_negative, tau=problem.tau,
        dystress=problem.request.dystress, margin=problem.margin, symmetric=problem.symmetric,
    )
    return reduce_terms(
        terms, loss=problem.loss, hardest_negative=problem.hardest_negative, reduction=problem.reduction,
        num_cols=problem.y.shape[1], has_heads=problem.has_heads,
    )
