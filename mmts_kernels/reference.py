"""The ``torch`` backend: the reference, and the spec in code.

It materializes S = x yᵀ (O(H·N·M) memory) and computes the statistics of ``mmts_kernels.stats`` with plain
torch ops, so autograd gives every gradient, including those of a learnable temperature or margin.
It runs anywhere torch runs, float64 included. The fused backends are tested against it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .stats import Stats, StatsRequest, compute_dtype
from .topk import torch_topk as compute_topk  # noqa: F401  (the top-k statistic's reference)


def unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    return None  # runs on every device torch supports


def compute_stats(
    x: torch.Tensor,
    y: torch.Tensor,
    tau: Optional[torch.Tensor],
    margin: Optional[torch.Tensor],
    targets: torch.Tensor,
    request: StatsRequest,
    self_cols: Optional[torch.Tensor] = None,
    *,
    bias: Optional[torch.Tensor] = None,
    labels: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    upcast: bool = True,
) -> Stats:
    """Statistics of S = x yᵀ, materialized. Excluded entries (``self_cols``, same-label columns under
    ``same_label="mask"``, and the positive from the lse when ``request.decoupled``) are masked out of the
    materialized S; autograd gives them zero gradient.

    ``upcast=True`` (the backend) computes S in fp32 (fp64 for fp64 inputs). ``upcast=False`` computes S in the
    input dtype and only then upcasts: the "torch in the same low precision" baseline the accuracy tests
    bound the fused kernels by.
    """
    cdt = compute_dtype(x.dtype)
    if upcast:
        S = torch.matmul(x.to(cdt), y.to(cdt).transpose(-1, -2))
    else:
        S = torch.matmul(x, y.transpose(-1, -2)).to(cdt)
    H, N, M = S.shape
    columns = torch.arange(M, device=S.device).view(1, 1, M)
    is_pos = targets.view(1, N, 1) == columns  # [1, N, M]; all False in a row whose target is −1
    is_self = (self_cols.view(1, N, 1) == columns) if self_cols is not None else torch.zeros_like(is_pos)
    same = (labels[0].view(1, N, 1) == labels[1].view(1, 1, M)) if request.same_label else torch.zeros_like(is_pos)
    if request.same_label == "mask":
        # false-negative elimination: same-label columns other than the target leave every statistic, as the row
        # itself does; the matrix serves the column direction too (there the target is the diagonal)
        is_self = is_self | (same & ~is_pos)
    has_pos = (targets >= 0).view(1, N, 1)
    pos = torch.where(has_pos, S.gather(2, targets.clamp(min=0).view(1, N, 1).expand(H, N, 1)), 0.0).squeeze(2)
    out = {"pos": pos}
    if request.sigmoid:  # u_ij = S_ij/τ_i + b_i, sig_i = Σ_j softplus(−z_ij u_ij)
        positive = is_pos | same if request.same_label == "positive" else is_pos
        z = torch.where(positive, 1.0, -1.0).to(cdt)
        u = S / tau.to(cdt).unsqueeze(2) + bias.to(cdt).unsqueeze(2)
        # softplus(−zu) = −log σ(zu): logsigmoid is exact for every argument (F.softplus returns v itself above
        # 20, 2e-9 off) and its gradient is σ, 0.5 at 0 (a max(v, 0) form would give 1 there)
        out["sig"] = (-F.logsigmoid(z * u)).masked_fill(is_self, 0.0).sum(2)

    if request.lse:
        if request.dystress is not None:
            tau_rows = tau_cols = request.dystress.on(S)  # detached unless DySTreSS(detach=False)
        else:
            tau_rows, tau_cols = tau.to(cdt).unsqueeze(2), tau.to(cdt).unsqueeze(1)  # row i: τ_i, column j: τ_j
        out_of_lse = is_self | is_pos if request.decoupled else is_self
        logits = (S / tau_rows).masked_fill(out_of_lse, float("-inf"))
        out["lse"], out["ws"] = _lse_ws(S, logits, dim=2, want_ws=request.ws)
        if request.cols:
            out["lse_c"], out["ws_c"] = _lse_ws(S, (S / tau_cols).masked_fill(is_self, float("-inf")), dim=1,
                                                want_ws=request.ws)

    if request.hinge:
        m = margin.to(cdt)
        out["hinge"], out["cnt"] = _hinge(m.unsqueeze(2) + S - pos.unsqueeze(2), is_pos | is_self, dim=2)
        if request.cols:  # column j: positive S_jj = pos[j], margin m_j
            out["hinge_c"], out["cnt_c"] = _hinge(m.unsqueeze(1) + S - pos.unsqueeze(1), is_pos | is_self, dim=1)

    if request.hard:
        out["hard"], out["arg"] = _first_max(S.masked_fill(is_pos | is_self, float("-inf")), dim=2)
        if request.cols:
            out["hard_c"], out["arg_c"] = _first_max(S.masked_fill(is_pos | is_self, float("-inf")), dim=1)
    return Stats(**out)


def _lse_ws(S: torch.Tensor, logits: torch.Tensor, dim: int, want_ws: bool):
    lse = torch.logsumexp(logits, dim=dim)
    ws = (torch.softmax(logits, dim=dim) * S).sum(dim) if want_ws else None
    return lse, ws


def _hinge(violation: torch.Tensor, is_pos: torch.Tensor, dim: int):
    violation = violation.masked_fill(is_pos, 0.0)  # the positive pair is not its own negative
    return torch.relu(violation).sum(dim), (violation > 0).sum(dim)


def _first_max(values: torch.Tensor, dim: int):
    """Max along ``dim`` and the lowest index that attains it (ties resolved deterministically). A NaN is the
    max, as in ``amax``, at its first position."""
    best = values.amax(dim=dim, keepdim=True)
    idx = torch.arange(values.shape[dim], device=values.device).view([-1 if d == dim else 1 for d in range(3)])
    hit = (values == best) | (values.isnan() & best.isnan())
    arg = torch.where(hit, idx, values.shape[dim]).amin(dim=dim)
    return values.gather(dim, arg.unsqueeze(dim)).squeeze(dim), arg
