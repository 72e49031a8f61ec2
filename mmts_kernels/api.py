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
    bias=None,
    labels=None,
    same_label: str = "positive",
) -> torch.Tensor:
    """Contrastive loss between the rows of ``x`` [N, D] (or [H, N, D]) and ``y`` [M, D] (or [H, M, D]).

    loss:              "infonce" (uses ``temperature``), "max_margin" (uses ``margin``) or "sigmoid" (SigLIP; uses
                       ``temperature`` and ``bias``; see ``mk.sigmoid_loss``).
    temperature:       float, 0-dim / [N] / [H, N] tensor (may require grad), or ``mk.DySTreSS(...)`` (InfoNCE).
                       Row i uses τ_i; in the symmetric loss column j uses τ_j (MM-TS semantics).
    margin:            float, 0-dim / [N] / [H, N] tensor; per-sample margins as in MM-TS max-margin.
    hardest_negative:  max_margin only: VSE++ hardest negative instead of all negatives.
    targets:           [N] integer positive column of each row (needs ``symmetric=False``); default arange(N).
    symmetric:         both directions (x→y and y→x); needs N == M and targets=None. The sigmoid loss is one sum
                       over every pair either way.
    reduction:         "mean" | "sum" | "none" (per-anchor terms, [2, N] symmetric, [N] otherwise; [H, …] with
                       heads). With heads, "mean" and "sum" reduce each head and sum over heads.
    bias:              sigmoid only: float, 0-dim / [N] / [H, N] tensor, the b_i of σ(z(S/τ + b)); default −10.
    labels:            the class of each sample: an [N] integer tensor (square batches), or a pair
                       (labels_x [N], labels_y [M]); each row's target must carry its label.
    same_label:        what the other columns of a row's class are. "positive" (default): positives too — InfoNCE
                       becomes SupCon's L_out (lse_i − mean_{p∈P_i} S_ip/τ_i, the lse over every column), the
                       sigmoid loss gives them z = +1, max-margin does not take them as negatives. "ignore": they
                       leave the loss (false-negative elimination: out of the denominator / the negatives).
    normalize:         L2-normalize x and y (differentiably) first; the library never normalizes silently.
    check_finite:      raise ValueError on NaN/Inf inputs instead of propagating NaN.
    backend:           "auto" | "torch" | "triton" | "cpp"; see ``mk.available_backends()``.
    deterministic:     bitwise-reproducible fused kernels; default ``torch.are_deterministic_algorithms_enabled()``.
    process_group:     a torch.distributed group: local loss against negatives gathered from every rank.

    Returns fp32 (fp64 for fp64 inputs) whatever the input dtype.
    """
    if bias is not None and loss != "sigmoid":
        raise ValueError(f"bias: loss={loss!r} does not use a bias (the sigmoid loss does); remove it")
    problem = validate(
        x, y, loss=loss, temperature=temperature, margin=margin, hardest_negative=hardest_negative,
        targets=targets, symmetric=symmetric, reduction=reduction, check_finite=check_finite, backend=backend,
        deterministic=deterministic, normalize=normalize, distributed=process_group is not None,
        bias=-10.0 if bias is None else bias, labels=labels, same_label=same_label,
    )
    impl = backends.resolve(backend, problem.x.device)
    if normalize:
        problem = _normalized(problem)
    if process_group is not None:
        from . import distributed  # torch.distributed is only touched when asked for

        return distributed.distributed_loss(problem, impl, process_group)
    return losses.loss_from_problem(problem, impl)


def info_nce(x: torch.Tensor, y: torch.Tensor, temperature=0.07, **kwargs) -> torch.Tensor:
    """InfoNCE (CLIP loss): ``contrastive_loss(x, y, loss="infonce", temperature=temperature, ...)``; with
    ``labels``, SupCon (same_label="positive") or false-negative elimination (same_label="ignore")."""
    _refuse_unused(kwargs, "margin", "info_nce", "max_margin")
    _refuse_unused(kwargs, "bias", "info_nce", "sigmoid_loss")
    return contrastive_loss(x, y, loss="infonce", temperature=temperature, **kwargs)


def max_margin(x: torch.Tensor, y: torch.Tensor, margin=0.2, **kwargs) -> torch.Tensor:
    """Max-margin ranking loss: ``contrastive_loss(x, y, loss="max_margin", margin=margin, ...)``."""
    _refuse_unused(kwargs, "temperature", "max_margin", "info_nce")
    _refuse_unused(kwargs, "bias", "max_margin", "sigmoid_loss")
    return contrastive_loss(x, y, loss="max_margin", margin=margin, **kwargs)


def sigmoid_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    temperature=0.1,
    bias=-10.0,
    *,
    targets: torch.Tensor | None = None,
    labels=None,
    same_label: str = "positive",
    reduction: str = "mean",
    normalize: bool = False,
    check_finite: bool = False,
    backend: str = "auto",
    deterministic: bool | None = None,
    process_group=None,
) -> torch.Tensor:
    """SigLIP's sigmoid loss between the rows of ``x`` [N, D] and ``y`` [M, D] (or [H, N, D] / [H, M, D]):

        L = −(1/N) Σ_i Σ_j log σ(z_ij · (S_ij/τ_i + b_i)),   S = x yᵀ,   z_ij = +1 for row i's positive, −1 else

    temperature:   float, 0-dim, [N] or [H, N] tensor, may require grad (τ_i = 1/logit_scale in open_clip's terms;
                   MM-TS's per-sample τ applies per row).
    bias:          float, 0-dim, [N] or [H, N] tensor, may require grad (open_clip's logit_bias).
    targets:       [N] integer positive column of each row; default arange(N) (needs N == M).
    labels, same_label: as ``contrastive_loss``: "positive" makes every same-label column a positive (z = +1),
                   "ignore" leaves the same-label columns other than the target out of the sum.
    reduction:     "mean" (÷ N, as open_clip and big_vision), "sum", "none" ([N] per row; [H, N] with heads).
    process_group: a torch.distributed group: each rank passes its local x, y; the y blocks travel around the ring
                   (point-to-point, as in the SigLIP paper), never all gathered: memory per rank O(local N·D). The
                   mean over ranks of the returned losses equals one process on the concatenated batch.

    The fused backends never hold the N × M matrix: the statistic Σ_j softplus(−z_ij(S_ij/τ_i + b_i)) is streamed
    tile by tile and the backward recomputes the tiles. Returns fp32 (fp64 for fp64 inputs).
    """
    return contrastive_loss(x, y, loss="sigmoid", temperature=temperature, bias=bias, targets=targets,
                            symmetric=targets is None, labels=labels, same_label=same_label, reduction=reduction,
                            normalize=normalize, check_finite=check_finite, backend=backend,
                            deterministic=deterministic, process_group=process_group)


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
    labels: torch.Tensor | None = None,
    same_label: str = "positive",
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
    labels:        [B] integer class of each sample (both views share it): SupCon. same_label="positive" (default):
                   L_a = lse_a − mean_{p∈P(a)} S_ap/τ_a over every other row of a's class (SupCon's L_out; the lse
                   over j ≠ a; decoupled=True drops all of P(a) from it); "ignore": the other rows of a's class
                   leave the lse and the positive stays a's other view (false-negative elimination).

    The fused backends never hold the 2B × 2B matrix: extra memory O(B·D). Returns fp32 (fp64 for fp64 inputs).
    """
    problem = validate_nt_xent(z1, z2, temperature=temperature, decoupled=decoupled, reduction=reduction,
                               normalize=normalize, backend=backend, deterministic=deterministic,
                               distributed=process_group is not None, labels=labels, same_label=same_label)
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
