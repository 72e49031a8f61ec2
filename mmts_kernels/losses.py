"""Losses as O(N) functions of the statistics (DESIGN §4). Shared by every backend, and by the single-process and
distributed paths (``loss_from_problem``: a validated problem's statistics from a backend, then its loss).

With s = row direction and c = column direction (symmetric losses only), per anchor i:

    InfoNCE              L_i = lse_i − pos_i / τ⁺_i         τ⁺_i = τ_i, or τ(sg(pos_i)) under DySTreSS
                                                             (τ(pos_i), differentiable, with detach=False)
    max-margin (all)     L_i = hinge_i                       Σ_{j≠t_i} relu(m_i + S_ij − pos_i)
    max-margin (hardest) L_i = relu(m_i + hard_i − pos_i)    VSE++ max_violation

The column direction uses the same τ⁺ and margin (pair j's per-sample values) and the column statistics.
Reductions, per head, then summed over heads:

    "none"  [2, N] for symmetric losses (row direction, column direction), [N] otherwise; [H, …] with a head axis
    "sum"   Σ of every per-anchor term
    "mean"  InfoNCE: ½(mean_i L^row_i + mean_j L^col_j) (or mean_i L_i one-directional)
            max-margin (all): Σ / number of (anchor, negative) terms = 2N(N−1) symmetric, N(M−1) otherwise
            hardest: Σ / number of anchors = 2N symmetric, N otherwise

NT-Xent (SimCLR; ``nt_xent_from_problem``): two views z1, z2 [B, D] of B samples, Z = cat(z1, z2) [2B, D]. Anchor a
of Z has its positive at p(a) = a ± B (its other view) and is itself left out (``self_cols``); it is one-directional
InfoNCE of Z against Z with targets p and self_cols a, the positive also out of the lse when decoupled (DCL):

    L_a = −S_{a,p(a)}/τ⁺_a + log Σ_{j ≠ a} exp(S_aj/τ_aj)        (decoupled: j ∉ {a, p(a)})

"none" [2, B] (anchors of z1, anchors of z2), "mean" Σ / 2B, "sum" Σ; per head, heads summed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from .stats import Stats
from .temperature import DySTreSS

if TYPE_CHECKING:
    from .validation import NTXentProblem, Problem


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
        tau_pos = dystress.on(pos) if dystress is not None else tau.to(pos.dtype)
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


def nt_xent_indices(b: int, offset: int, total: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, self_cols) [2b] of the anchors cat(z1[offset:offset+b], z2[offset:offset+b]) in a Z of 2·total rows
    (z1's ``total`` rows, then z2's): the positive of z1's sample i is row total + i, of z2's row i."""
    i = torch.arange(offset, offset + b, device=device)
    return torch.cat((i + total, i)), torch.cat((i, i + total))


def nt_xent_terms(stats: Stats, tau: Optional[torch.Tensor], dystress: Optional[DySTreSS], b: int) -> torch.Tensor:
    """Per-anchor NT-Xent terms [H, 2, b] from the row statistics of the 2b anchors."""
    terms = per_anchor_terms(stats, loss="infonce", hardest_negative=False, tau=tau, dystress=dystress,
                             margin=None, symmetric=False)
    return terms.view(terms.shape[0], 2, b)


def nt_xent_from_problem(problem: NTXentProblem, impl) -> torch.Tensor:
    """NT-Xent of one process: the row statistics of Z = cat(z1, z2) against itself, then the O(B) loss."""
    B = problem.z1.shape[1]
    Z = torch.cat((problem.z1, problem.z2), dim=1)
    targets, self_cols = nt_xent_indices(B, 0, B, Z.device)
    stats = impl.compute_stats(Z, Z, problem.tau, None, targets, problem.request, self_cols=self_cols)
    terms = nt_xent_terms(stats, problem.tau, problem.request.dystress, B)
    return reduce_terms(terms, loss="infonce", hardest_negative=False, reduction=problem.reduction,
                        num_cols=2 * B, has_heads=problem.has_heads)
