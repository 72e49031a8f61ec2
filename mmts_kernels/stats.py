"""The contract between the API and every backend: which statistics of S = x yᵀ to compute, and what comes back.

Every loss of the library is a cheap O(N) function of per-row (and, for symmetric losses, per-column)
statistics of the similarity matrix S (DESIGN §3). A backend implements exactly one function,

    compute_stats(x, y, tau, margin, targets, request, self_cols=None, *, bias=None, labels=None) -> Stats

with these inputs (already validated and normalized by ``mmts_kernels.validation``):

    x        [H, N, D]  floating (fp64, fp32, bf16 or fp16), any strides
    y        [H, M, D]  same dtype and device as x
    tau      [H, N]     per-sample temperature (fp32, or fp64 for fp64 inputs), possibly an expanded view,
                        possibly requiring grad; None when ``request.dystress`` is set or no lse is requested
    margin   [H, N]     per-sample margin (same dtype rules), possibly requiring grad; None when no hinge /
                        hardest negative is requested
    targets  [N] int64  positive column of each row; ``arange(N)`` in the symmetric case. −1: row i has no
                        positive column in this y (only with ``request.sigmoid`` and nothing else requested: the
                        distributed ring's blocks of other ranks); pos_i is then 0
    self_cols  [N] int64 or None: column self_cols[i] is row i itself (NT-Xent, where x = y = cat(views)); it is
                        left out of every statistic of row i (lse, ws, hinge/cnt, hard, sig). Row direction only
                        (``request.cols`` False); self_cols[i] ≠ targets[i], and every row keeps at least one column
    bias     [H, N]     per-sample bias of the sigmoid loss (same dtype rules as tau), possibly requiring grad;
                        given exactly when ``request.sigmoid``
    labels   (lx [N], ly [M]) int64, or None: the class of each row and of each column, given exactly when
                        ``request.same_label`` is set; same_ij = (lx_i == ly_j). Callers guarantee
                        lx_i == ly_{t_i} (the target is always a same-label column) where t_i ≥ 0

and it returns a ``Stats`` whose requested fields are [H, N] tensors (fp32, or fp64 for fp64 inputs;
``cnt`` and ``arg`` int64), differentiable with respect to x, y, tau and margin:

    pos_i   = S_{i,t_i}
    lse_i   = log Σ_j exp(S_ij / τ_ij)          τ_ij = tau[i] (row), or dystress(sg(S_ij)) (see detach below)
    hinge_i = Σ_{j≠t_i} relu(m_i + S_ij − pos_i),   cnt_i = #{ j≠t_i : m_i + S_ij − pos_i > 0 }
    hard_i  = max_{j≠t_i} S_ij,   arg_i = its column (the lowest such column on ties)
    ws_i    = Σ_j softmax_j(S_ij/τ_ij) · S_ij    (what a fused backward needs for ∂lse_i/∂τ_i = −ws_i/τ_i²)
    sig_i   = Σ_j softplus(−z_ij · (S_ij/τ_i + b_i))      the sigmoid (SigLIP) loss of row i, per-row τ_i and b_i;
              z_ij = +1 for the positive t_i (and, when same_label = "positive", every same-label column), −1
              elsewhere. Differentiable w.r.t. x, y, tau and bias:
                  ∂sig_i/∂S_ij = −z_ij σ(−z_ij u_ij)/τ_i,  ∂sig_i/∂b_i = −Σ_j z_ij σ(−z_ij u_ij),
                  ∂sig_i/∂τ_i = Σ_j z_ij σ(−z_ij u_ij) S_ij/τ_i²          (u_ij = S_ij/τ_i + b_i)
              softplus(v) = max(v, 0) + log1p(exp(−|v|)), finite for every finite v. DySTreSS does not apply.

With E_i the excluded columns of row i — {self_cols[i]}, plus t_i from the lse and ws when ``request.decoupled``
(DCL: the positive leaves the denominator; the loss is still lse_i − pos_i/τ⁺_i) — every sum and max above runs over
j ∉ E_i. Labels: when ``request.same_label == "mask"``, E_i also holds every same-label column other than t_i
(false-negative elimination; in the column direction, column j leaves out every same-label row other than j).
``same_label == "positive"`` changes only sig (the z_ij above). A row the mask leaves without a negative has
hinge 0, cnt 0 and hard −inf (its arg is unspecified, and the losses give it no gradient). Under DySTreSS with ``detach=False`` the
τ_ij = dystress(S_ij) is not detached: the statistics are differentiable through it (∂(S/τ(S))/∂S = 1/τ − S·τ'(S)/τ²).

The ``*_c`` fields are the same statistics of column j over Sᵀ (only when ``request.cols``, which implies the
square symmetric case, targets = arange(N)): they use τ_j and m_j, the per-sample values of pair j, and the
column positive S_jj, which equals ``pos[j]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from .temperature import DySTreSS


@dataclass(frozen=True)
class StatsRequest:
    """Which statistics to compute; fused backends turn these into compile-time switches."""

    lse: bool = False
    hinge: bool = False
    hard: bool = False
    ws: bool = False  # only when tau requires grad
    cols: bool = False  # square symmetric case: the column statistics too, from the same pass
    dystress: Optional[DySTreSS] = None  # its ``detach`` says whether the gradient flows through τ(S)
    deterministic: bool = False
    decoupled: bool = False  # DCL: the positive t_i leaves the lse / ws of row i (row direction only)
    sigmoid: bool = False  # the sig statistic (needs bias); row direction only, no DySTreSS
    same_label: Optional[str] = None  # None, "mask" or "positive" (then labels are given): see the module docstring


class Stats(NamedTuple):
    """Per-row (and per-column ``*_c``) statistics; fields not requested are None."""

    pos: torch.Tensor
    lse: Optional[torch.Tensor] = None
    hinge: Optional[torch.Tensor] = None
    cnt: Optional[torch.Tensor] = None
    hard: Optional[torch.Tensor] = None
    arg: Optional[torch.Tensor] = None
    ws: Optional[torch.Tensor] = None
    lse_c: Optional[torch.Tensor] = None
    hinge_c: Optional[torch.Tensor] = None
    cnt_c: Optional[torch.Tensor] = None
    hard_c: Optional[torch.Tensor] = None
    arg_c: Optional[torch.Tensor] = None
    ws_c: Optional[torch.Tensor] = None
    sig: Optional[torch.Tensor] = None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and losses are fp32 for fp32/bf16/fp16 inputs and fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32
