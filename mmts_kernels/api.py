"""Public functional API (DESIGN §9): validate → pick a backend → statistics → loss."""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from . import backends, losses
from .validation import Problem, validate, validate_nt_xent


def contrastive_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss: str = "infonce",
    temperature=0.07,
    margin=0.2,
    hardest_negative: bool = False,
    targets: torch.Tensor | None = None,
    symmetric: bool = True,
    reduction: str = "mean",
    normalize: bool = False,
    check_finite: bool = False,
    backend: str = "auto",
    deterministic: bool | None = None,
    process_group=None,
) -> torch.Tensor:
    """Contrastive loss between the rows of ``x`` [N, D] (or [H, N, D]) and ``y`` [M, D] (or [H, M, D]).

    loss:              "infonce" (uses ``temperature``) or "max_margin" (uses ``margin``).
    temperature:       float, 0-dim / [N] / [H, N] tensor (may require grad), or ``mk.DySTreSS(...)``.
                       Row i uses τ_i; in the symmetric loss column j uses τ_j (MM-TS semantics).
    margin:            float, 0-dim / [N] / [H, N] tensor; per-sample margins as in MM-TS max-margin.
    hardest_negative:  max_margin only: VSE++ hardest negative instead of all negatives.
    targets:           [N] integer positive column of each row (needs ``symmetric=False``); default arange(N).
    symmetric:         both directions (x→y and y→x); needs N == M and targets=None.
    reduction:         "mean" | "sum" | "none" (per-anchor terms, [2, N] symmetric, [N] otherwise; [H, …] with
                       heads). With heads, "mean" and "sum" reduce each head and sum over heads.
    normalize:         L2-normalize x and y (differentiably) first; the library never normalizes silently.
    check_finite:      raise ValueError on NaN/Inf inputs instead of propagating NaN.
    backend:           "auto" | "torch" | "triton" | "cpp"; see ``mk.available_backends()``.
    deterministic:     bitwise-reproducible fused kernels; default ``torch.are_deterministic_algorithms_enabled()``.
    process_group:     a torch.distributed group: local loss against negatives gathered from every rank.

    Returns fp32 (fp64 for fp64 inputs) whatever the input dtype.
    """
    problem = validate(
        x, y, loss=loss, temperature=temperature, margin=margin, hardest_negative=hardest_negative,
        targets=targets, symmetric=symmetric, reduction=reduction, check_finite=check_finite, backend=backend,
        deterministic=deterministic, normalize=normalize, distributed=process_group is not None,
    )
    impl = backends.resolve(backend, problem.x.device)
    if normalize:
        problem = _normalized(problem)
    if process_group is not None:
        from . import distributed  # torch.distributed is only touched when asked for

        return distributed.distributed_loss(problem, impl, process_group)
    return losses.loss_from_problem(problem, impl)


def info_nce(x: torch.Tensor, y: torch.Tensor, temperature=0.07, **kwargs) -> torch.Tensor:
    """InfoNCE (CLIP loss): ``contrastive_loss(x, y, loss="infonce", temperature=temperature, ...)``."""
    _refuse_unused(kwargs, "margin", "info_nce", "max_margin")
    return contrastive_loss(x, y, loss="infonce", temperature=temperature, **kwargs)


def max_margin(x: torch.Tensor, y: torch.Tensor, margin=0.2, **kwargs) -> torch.Tensor:
    """Max-margin ranking loss: ``contrastive_loss(x, y, loss="max_margin", margin=margin, ...)``."""
    _refuse_unused(kwargs, "temperature", "max_margin", "info_nce")
    return contrastive_loss(x, y, loss="max_margin", margin=margin, **kwargs)


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature=0.1,
    *,
    decoupled: bool = False,
    reduction: str = "mean",
    normalize: bool = False,
    backend: str = "auto",
    deterministic: bool | None = None,
    process_group=None,
) -> torch.Tensor:
    """SimCLR's NT-Xent over two views ``z1``, ``z2`` [B, D] (or [H, B, D]) of the same B samples.

    With Z = cat(z1, z2) and S = Z Zᵀ, anchor a (one of 2B) has its positive at its other view p(a) = a ± B and as
    negatives every other row of both views; its own similarity S_aa is left out:

        L_a = −S_{a,p(a)}/τ_{a,p(a)} + log Σ_{j ≠ a} exp(S_aj/τ_aj)      (decoupled=True, DCL: Σ over j ∉ {a, p(a)})

    temperature:   float, 0-dim, [B] per sample (both views of sample i use τ_i), [2B] per anchor (z1's, then
                   z2's), [H, B] / [H, 2B] with heads, possibly requiring grad; or ``mk.DySTreSS(...)`` (τ_aj =
                   τ(S_aj) on every logit, the positive's too; ``detach=False`` lets the gradient flow through it).
    reduction:     "mean" (over the 2B anchors) | "sum" | "none" ([2, B]: anchors of z1, anchors of z2; [H, 2, B]
                   with heads). With heads, "mean" and "sum" reduce each head and sum over heads.
    normalize:     L2-normalize z1 and z2 (differentiably) first; the library never normalizes silently.
    process_group: a torch.distributed group: each rank passes its local views; the loss equals one process on
                   the concatenated batch (Z = all z1 in rank order, then all z2), as for ``info_nce``.

    The fused backends never hold the 2B × 2B matrix: extra memory O(B·D). Returns fp32 (fp64 for fp64 inputs).
    """
    problem = validate_nt_xent(z1, z2, temperature=temperature, decoupled=decoupled, reduction=reduction,
                               normalize=normalize, backend=backend, deterministic=deterministic,
                               distributed=process_group is not None)
    impl = backends.resolve(backend, problem.z1.device)
    if normalize:
        problem = replace(problem, z1=F.normalize(problem.z1, dim=-1), z2=F.normalize(problem.z2, dim=-1))
    if process_group is not None:
        from . import distributed

        return distributed.distributed_nt_xent(problem, impl, process_group)
    return losses.nt_xent_from_problem(problem, impl)


def _refuse_unused(kwargs: dict, name: str, function: str, user: str) -> None:
    # Someone passing it meant something: running without it would silently train a different loss.
    if name in kwargs:
        raise ValueError(f"{name}: {function} does not use a {name} ({user} does); remove it, or call "
                         f"mk.{user} / mk.contrastive_loss(loss=...) for the loss that uses it")


def _normalized(problem: Problem) -> Problem:
    return replace(problem, x=F.normalize(problem.x, dim=-1), y=F.normalize(problem.y, dim=-1))
