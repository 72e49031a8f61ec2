"""Losses as O(N) functions of the statistics (DESIGN §4). Shared by every backend, and by the single-process and
distributed paths (``loss_from_problem``: a validated problem's statistics from a backend, then its loss).

With s = row direction and c = column direction (symmetric losses only), per anchor i:

    InfoNCE              L_i = lse_i − pos_i / τ⁺_i         τ⁺_i = τ_i, or τ(sg(pos_i)) under DySTreSS
                                                             (τ(pos_i), differentiable, with detach=False)
    max-margin (all)     L_i = hinge_i                       Σ_{j≠t_i} relu(m_i + S_ij − pos_i)
    max-margin (hardest) L_i = relu(m_i + hard_i − pos_i)    VSE++ max_violation

    sigmoid (SigLIP)     L_i = sig_i = Σ_j softplus(−z_ij (S_ij/τ_i + b_i))     one sum over all pairs, no columns

The column direction uses the same τ⁺ and margin (pair j's per-sample values) and the column statistics.

Labels (``same_label``; P_i = the columns with row i's label, the target among them, the row itself excluded):
"ignore" masks P_i minus t_i out of every statistic (false-negative elimination). "positive": InfoNCE becomes
SupCon's L_out, L_i = lse_i − mean_{p∈P_i} S_ip/τ_i, with the lse over every column and the mean from per-class
sums (``label_positive_mean``: exact, O((N + M)·D), no kernel involved); the sigmoid loss gives every p ∈ P_i
z = +1; max-margin takes no p ∈ P_i as a negative (the two modes agree there).
Reductions, per head, then summed over heads:

    "none"  [2, N] for symmetric losses (row direction, column direction), [N] otherwise; [H, …] with a head axis
    "sum"   Σ of every per-anchor term
    "mean"  InfoNCE: ½(mean_i L^row_i + mean_j L^col_j) (or mean_i L_i one-directional)
            max-margin (all): Σ / number of (anchor, negative) terms = 2N(N−1) symmetric, N(M−1) otherwise
            hardest: Σ / number of anchors = 2N symmetric, N otherwise
            sigmoid: Σ / N, as open_clip and big_vision (the rows: x's samples)

NT-Xent (SimCLR; ``nt_xent_from_problem``): two views z1, z2 [B, D] of B samples, Z = cat(z1, z2) [2B, D]. Anchor a
of Z has its positive at p(a) = a ± B (its other view) and is itself left out (``self_cols``); it is one-directional
InfoNCE of Z against Z with targets p and self_cols a, the positive also out of the lse when decoupled (DCL):

    L_a = −S_{a,p(a)}/τ⁺_a + log Σ_{j ≠ a} exp(S_aj/τ_aj)        (decoupled: j ∉ {a, p(a)})

"none" [2, B] (anchors of z1, anchors of z2), "mean" Σ / 2B, "sum" Σ; per head, heads summed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from .stats import Stats, compute_dtype
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
    positives: Optional[tuple] = None,
) -> torch.Tensor:
    """Per-anchor loss terms, [H, 2, N] when symmetric else [H, N]. ``positives``: the InfoNCE numerators of
    same_label="positive" (row, column) in place of S_{i,t_i}."""
    pos = stats.pos
    if loss == "sigmoid":
        return stats.sig
    if loss == "infonce":
        tau_pos = dystress.on(pos) if dystress is not None else tau.to(pos.dtype)
        pos_row, pos_col = positives if positives is not None else (pos, pos)
        row = stats.lse - pos_row / tau_pos
        col = stats.lse_c - pos_col / tau_pos if symmetric else None
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


def label_positive_mean(x: torch.Tensor, y: torch.Tensor, labels_x: torch.Tensor, labels_y: torch.Tensor,
                        self_cols: Optional[torch.Tensor] = None) -> torch.Tensor:
    """mean_{p ∈ P_i} S_ip [H, N] (compute dtype), P_i = {j : labels_y[j] = labels_x[i]} minus column self_cols[i]
    (which has row i's label), for x [H, N, D], y [H, M, D]: Σ_{p∈P_i} S_ip = x_i · (Σ_{p∈P_i} y_p), from one sum
    of y per class, so O((N + M)·D) memory. Classes are found by sorting labels_y (static shapes, no unique()):
    class c's sum sits at the first position of c in the sorted labels. A row whose class has no column gets NaN
    (0/0); callers guarantee one (the target)."""
    cdt = compute_dtype(x.dtype)
    xs, ys = x.to(cdt), y.to(cdt)
    M = ys.shape[1]
    sorted_y, _ = torch.sort(labels_y)
    slot_y = torch.searchsorted(sorted_y, labels_y)  # [M] in [0, M): one slot per class
    slot_x = torch.searchsorted(sorted_y, labels_x).clamp(max=M - 1)
    present = sorted_y[slot_x] == labels_x
    sums = ys.new_zeros(ys.shape).index_add_(1, slot_y, ys)  # [H, M, D], class sums at their slots
    counts = torch.zeros(M, dtype=cdt, device=ys.device).index_add_(0, slot_y, torch.ones_like(labels_y, dtype=cdt))
    total = (xs * sums[:, slot_x]).sum(-1)  # [H, N]
    count = torch.where(present, counts[slot_x], 0.0)
    if self_cols is not None:
        total = total - (xs * ys[:, self_cols]).sum(-1)
        count = count - 1
    return total / count


def loss_from_problem(problem: Problem, impl) -> torch.Tensor:
    """Statistics from the backend, then the O(N) loss on top of them."""
    stats = impl.compute_stats(problem.x, problem.y, problem.tau, problem.margin, problem.targets, problem.request,
                               **kernel_extras(problem))
    terms = per_anchor_terms(
        stats, loss=problem.loss, hardest_negative=problem.hardest_negative, tau=problem.tau,
        dystress=problem.request.dystress, margin=problem.margin, symmetric=problem.symmetric,
        positives=label_positives(problem, (problem.x, problem.y, *problem.labels),
                                  (problem.y, problem.x, *reversed(problem.labels))) if problem.labels else None,
    )
    return reduce_terms(
        terms, loss=problem.loss, hardest_negative=problem.hardest_negative, reduction=problem.reduction,
        num_cols=problem.y.shape[1], has_heads=problem.has_heads,
    )


def kernel_extras(problem: Problem, labels: Optional[tuple] = None) -> dict:
    """The keyword arguments of ``compute_stats`` beyond the positional ones: the sigmoid loss's bias, and the
    labels when the statistics compare them (``labels``: the pair to use instead of the problem's own)."""
    extras = {}
    if problem.request.sigmoid:
        extras["bias"] = problem.bias
    if problem.request.same_label is not None:
        extras["labels"] = labels if labels is not None else problem.labels
    return extras


def label_positives(problem: Problem, rows: tuple, cols: tuple) -> Optional[tuple]:
    """The numerators (row [H, n], column [H, m] or None) of InfoNCE with same_label="positive", or None when the
    loss does not use them. ``rows`` = (x, y, labels_x, labels_y): each row of x against every column of y;
    ``cols`` the same with the roles swapped, for the column direction (symmetric losses). One process passes its
    whole batch; a rank passes its local rows against the gathered columns."""
    if problem.loss != "infonce" or problem.same_label != "positive":
        return None
    return label_positive_mean(*rows), (label_positive_mean(*cols) if problem.symmetric else None)


def nt_xent_indices(b: int, offset: int, total: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, self_cols) [2b] of the anchors cat(z1[offset:offset+b], z2[offset:offset+b]) in a Z of 2·total rows
    (z1's ``total`` rows, then z2's): the positive of z1's sample i is row total + i, of z2's row i."""
    i = torch.arange(offset, offset + b, device=device)
    return torch.cat((i + total, i)), torch.cat((i, i + total))


def nt_xent_terms(stats: Stats, tau: Optional[torch.Tensor], dystress: Optional[DySTreSS], b: int,
                  positives: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-anchor NT-Xent terms [H, 2, b] from the row statistics of the 2b anchors (``positives``: SupCon's
    numerators, same_label="positive")."""
    terms = per_anchor_terms(stats, loss="infonce", hardest_negative=False, tau=tau, dystress=dystress,
                             margin=None, symmetric=False,
                             positives=(positives, None) if positives is not None else None)
    return terms.view(terms.shape[0], 2, b)


def nt_xent_labeled(problem: NTXentProblem, anchors: torch.Tensor, Z: torch.Tensor, anchor_labels, all_labels,
                    self_cols: torch.Tensor):
    """(compute_stats keyword arguments, SupCon numerators or None) of NT-Xent with labels: the anchors' labels
    against Z's (each sample's label on both of its rows)."""
    if problem.labels is None:
        return {}, None
    extras = {"labels": (anchor_labels, all_labels)} if problem.request.same_label is not None else {}
    positives = None
    if problem.same_label == "positive":  # SupCon L_out: every other row of the class, the other view included
        positives = label_positive_mean(anchors, Z, anchor_labels, all_labels, self_cols=self_cols)
    return extras, positives


def nt_xent_from_problem(problem: NTXentProblem, impl) -> torch.Tensor:
    """NT-Xent of one process: the row statistics of Z = cat(z1, z2) against itself, then the O(B) loss."""
    B = problem.z1.shape[1]
    Z = torch.cat((problem.z1, problem.z2), dim=1)
    targets, self_cols = nt_xent_indices(B, 0, B, Z.device)
    z_labels = torch.cat((problem.labels, problem.labels)) if problem.labels is not None else None
    extras, positives = nt_xent_labeled(problem, Z, Z, z_labels, z_labels, self_cols)
    stats = impl.compute_stats(Z, Z, problem.tau, None, targets, problem.request, self_cols=self_cols, **extras)
    terms = nt_xent_terms(stats, problem.tau, problem.request.dystress, B, positives)
    return reduce_terms(terms, loss="infonce", hardest_negative=False, reduction=problem.reduction,
                        num_cols=2 * B, has_heads=problem.has_heads)
