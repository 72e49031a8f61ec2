"""AMCL: Adaptive Multi-head Contrastive Learning (Wang et al., ECCV'24), DESIGN §5, §10.

Per head h (independent projection heads; inputs [H, B, D], or [B, D] for one head), on normalized features, with
the pair temperature

    τ(a, b) = τ_min + (τ_max − τ_min)·σ(−⟨φ(a), φ(b)⟩)      φ = Linear(d, 128) → ReLU → Linear(128, d), shared by heads

and, for an anchor a with positive p(a) and its k hardest negatives n_1..n_k (the largest s(a, n) = ⟨z_a, z_n⟩),

    L_a = −s⁺/τ⁺ + (1/k) Σ_q s_q/τ_q + β·Ω(τ⁺) − β·Σ_q (log τ_q + 1/τ_q)        Ω(τ) = (d/2)·log τ + 1/τ
    s⁺ = s(a, p(a)), τ⁺ = τ(a, p(a)),  s_q = s(a, n_q), τ_q = τ(a, n_q);   τ_min = 1e-5, τ_max = 2, β = 1e-4, k = 100

Three forms (``form=``):

- ``"simclr"`` (the default; the published loss): two views z1, z2 give 2B anchors Z = cat(z1, z2); p(a) = a ± B;
  the negatives are the other 2B − 2 rows (self and positive excluded), the k hardest of them, or all when
  2B − 2 < k. A head's loss is ½(mean over view-1 anchors + mean over view-2 anchors); heads are summed.
- ``"moco"`` (when ``queue`` is given): anchors q = z1 [B, D], positives keys = z2, negatives from
  y = cat(keys, queue): the k hardest of the B − 1 other keys and the K queue rows. One direction, mean over B.
- ``"cross_modal"``: this library's earlier restriction, kept for its users: x against y (two modalities), the single
  hardest negative (DESIGN §3 ``hard``), β·Ω on the negative too, one direction unless ``symmetric=True``,
  ``targets``, no normalization unless asked. (It expects ``AMCLTemperatureNet(dim, out_dim=64)``, its old φ.)

Fused: the k hardest negatives come from the top-k statistic (``mmts_kernels.topk``: indices only, O(N·k) memory on
``cpp`` and ``triton``, never O(N·M)); s_q and ⟨φ(z_a), φ(z_q)⟩ are then recomputed from the rows at those columns
(``topk.indexed_dot``: gathered in chunks of rows, nothing of size N·k·D kept for the backward), so autograd
carries the gradient through s into z1, z2 (and through τ into z1, z2 and φ's parameters) on every backend. The
choice of the k columns is not differentiated (it is piecewise constant). φ runs once per row (O(N·D·128)).
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import backends, losses
from .stats import compute_dtype
from .topk import check_k, indexed_dot
from .validation import check_tensor_layout, check_views, validate

TAU_MIN, TAU_MAX, BETA, TOPK = 1e-5, 2.0, 1e-4, 100
FORMS = ("simclr", "moco", "cross_modal")
_REDUCTIONS = ("mean", "sum", "none")
_BACKENDS = ("auto", "torch", "triton", "cpp")


class AMCLTemperatureNet(nn.Module):
    """φ: Linear(dim, hidden) → ReLU → Linear(hidden, out_dim), shared across heads; out_dim defaults to dim (the
    published φ: Linear(d, 128) → ReLU → Linear(128, d)).

    ``temperature(a, b)`` = τ_min + (τ_max − τ_min)·sigmoid(−⟨φ(a), φ(b)⟩) for paired rows of a and b.
    """

    def __init__(self, dim: int, hidden: int = 128, out_dim: Optional[int] = None):
        super().__init__()
        out_dim = dim if out_dim is None else out_dim
        for name, v in (("dim", dim), ("hidden", hidden), ("out_dim", out_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.dim = dim
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)

    def temperature(self, a: torch.Tensor, b: torch.Tensor, tau_min: float = TAU_MIN,
                    tau_max: float = TAU_MAX) -> torch.Tensor:
        return _tau_from_codes(self(a), self(b), tau_min, tau_max)


def amcl_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature_net: nn.Module,
    *,
    topk: Optional[int] = None,
    queue: Optional[torch.Tensor] = None,
    form: Optional[str] = None,
    beta: float = BETA,
    tau_min: float = TAU_MIN,
    tau_max: float = TAU_MAX,
    omega_dim: Optional[float] = None,
    normalize: Optional[bool] = None,
    reduction: str = "mean",
    targets: Optional[torch.Tensor] = None,
    symmetric: Optional[bool] = None,
    check_finite: bool = False,
    backend: str = "auto",
    deterministic: Optional[bool] = None,
) -> torch.Tensor:
    """Multi-head AMCL loss; with the defaults, the published SimCLR-form loss (see the module docstring).

    z1, z2:           [B, D] or [H, B, D]: the two views ("simclr"), queries and keys ("moco"), or x [N, D] and
                      y [M, D] ("cross_modal").
    temperature_net:  φ, a module mapping [..., D] → [..., P] (``AMCLTemperatureNet(D)``), shared across heads.
    topk:             the k hardest negatives per anchor (default 100; fewer when an anchor has fewer negatives).
    queue:            [K, D] or [H, K, D] negatives of the MoCo form (selects ``form="moco"``).
    form:             "simclr" | "moco" | "cross_modal"; default "moco" with a queue, else "simclr".
    beta, tau_min, tau_max:  β = 1e-4, τ ∈ (1e-5, 2) as the paper.   omega_dim: the d of Ω; default D.
    normalize:        L2-normalize the features first (differentiably); default True, False for "cross_modal".
    reduction:        "mean": Σ_h mean over anchors; "sum": Σ_h Σ_anchors; "none": per anchor, [H, 2, B] for
                      "simclr" (view-1 anchors, view-2 anchors), [H, B] for "moco", as before for "cross_modal";
                      no H without a head axis.
    targets, symmetric:  "cross_modal" only (as ``mk.contrastive_loss``; default symmetric=False).
    check_finite, backend, deterministic:  as ``mk.contrastive_loss``.

    Returns fp32 (fp64 for fp64 inputs).
    """
    form = _check_form(form, queue)
    if not isinstance(temperature_net, nn.Module):
        raise TypeError(f"temperature_net must be an nn.Module (e.g. AMCLTemperatureNet), "
                        f"got {type(temperature_net).__name__}")
    _check_scalars(beta, tau_min, tau_max, omega_dim)
    if normalize is None:
        normalize = form != "cross_modal"
    if form == "cross_modal":
        if topk is not None or queue is not None:
            raise ValueError(f"{'topk' if topk is not None else 'queue'}: form='cross_modal' uses the single "
                             "hardest negative of y; use form='simclr' or 'moco' for top-k negatives")
        return _cross_modal_loss(z1, z2, temperature_net, beta=beta, tau_min=tau_min, tau_max=tau_max,
                                 omega_dim=omega_dim, targets=targets, symmetric=bool(symmetric),
                                 reduction=reduction, normalize=normalize, check_finite=check_finite,
                                 backend=backend, deterministic=deterministic)
    for name, v in (("targets", targets), ("symmetric", symmetric)):
        if v is not None:
            raise ValueError(f"{name}: form={form!r} fixes the positives (each anchor's other view or key); "
                             f"{name} applies to form='cross_modal' only")
    topk = TOPK if topk is None else topk
    check_k(topk, available=math.inf, name="topk")
    z1_3, z2_3, has_heads = _check_views(z1, z2)
    queue_3 = _check_queue(queue, z1_3) if form == "moco" else None
    _check_options(reduction, backend, normalize, check_finite, deterministic)
    if check_finite and not torch.compiler.is_compiling():
        for name, t in (("z1", z1_3), ("z2", z2_3), ("queue", queue_3)):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or Inf (check_finite=True)")
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()

    impl = backends.resolve(backend, z1_3.device)
    cdt = compute_dtype(z1_3.dtype)
    prepared = [t.to(cdt) for t in (z1_3, z2_3, queue_3) if t is not None]
    if normalize:
        prepared = [F.normalize(t, dim=-1) for t in prepared]
    d = float(z1_3.shape[-1] if omega_dim is None else omega_dim)
    params = dict(beta=beta, tau_min=tau_min, tau_max=tau_max, d=d, impl=impl, topk=topk,
                  deterministic=deterministic)
    if form == "simclr":
        terms = _simclr_terms(prepared[0], prepared[1], temperature_net, **params)  # [H, 2, B]
    else:
        terms = _moco_terms(prepared[0], prepared[1], prepared[2], temperature_net, **params)  # [H, B]
    if reduction == "none":
        return terms if has_heads else terms.squeeze(0)
    per_head = terms.flatten(1).sum(1)
    return (per_head / terms[0].numel() if reduction == "mean" else per_head).sum()


def omega(tau: torch.Tensor, d: float) -> torch.Tensor:
    """The AMCL regularizer Ω(τ) = (d/2) log τ + 1/τ."""
    return 0.5 * d * torch.log(tau) + 1.0 / tau


class AMCLLoss(nn.Module):
    """``amcl_loss`` as a module holding the temperature network φ (an ``AMCLTemperatureNet(dim, hidden, out_dim)``
    unless ``temperature_net`` is given). ``forward(z1, z2, queue=None, targets=None)``; optimize its parameters with
    the model's. Defaults: the published SimCLR-form loss."""

    def __init__(
        self,
        dim: Optional[int] = None,
        *,
        hidden: int = 128,
        out_dim: Optional[int] = None,
        temperature_net: Optional[nn.Module] = None,
        topk: Optional[int] = None,
        form: Optional[str] = None,
        beta: float = BETA,
        tau_min: float = TAU_MIN,
        tau_max: float = TAU_MAX,
        omega_dim: Optional[float] = None,
        normalize: Optional[bool] = None,
        reduction: str = "mean",
        symmetric: Optional[bool] = None,
        check_finite: bool = False,
        backend: str = "auto",
        deterministic: Optional[bool] = None,
    ):
        super().__init__()
        if temperature_net is None:
            if dim is None:
                raise ValueError("dim (the embedding size) is required unless temperature_net is given")
            temperature_net = AMCLTemperatureNet(dim, hidden, out_dim)
        elif not isinstance(temperature_net, nn.Module):
            raise TypeError(f"temperature_net must be an nn.Module, got {type(temperature_net).__name__}")
        self.temperature_net = temperature_net
        self.options = dict(topk=topk, form=form, beta=beta, tau_min=tau_min, tau_max=tau_max, omega_dim=omega_dim,
                            normalize=normalize, reduction=reduction, symmetric=symmetric,
                            check_finite=check_finite, backend=backend, deterministic=deterministic)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, queue: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        return amcl_loss(z1, z2, self.temperature_net, queue=queue, targets=targets, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v is not None)


# ---------------------------------------------------------------------------------------------------------------
# The SimCLR and MoCo forms: top-k indices from the backend, then everything by gathering rows.

def _simclr_terms(z1, z2, net, **params) -> torch.Tensor:
    """[H, 2, B]: anchors a of Z = cat(z1, z2) against their other view p(a) = a ± B, negatives the other rows."""
    H, B, _ = z1.shape
    Z = torch.cat((z1, z2), dim=1)  # [H, 2B, D]
    first = torch.arange(B, device=Z.device)
    partner = torch.cat((first + B, first))  # p(a)
    own = torch.arange(2 * B, device=Z.device)
    phi = _codes(net, Z)
    terms = _anchor_terms(Z, phi, Z, phi, partner, own, **params)
    return terms.view(H, 2, B)


def _moco_terms(q, keys, queue, net, **params) -> torch.Tensor:
    """[H, B]: query i against its key i; negatives from cat(keys, queue) without key i."""
    y = torch.cat((keys, queue), dim=1)  # [H, B + K, D]
    targets = torch.arange(q.shape[1], device=q.device)
    return _anchor_terms(q, _codes(net, q), y, _codes(net, y), targets, None, **params)


def _anchor_terms(x, phi_x, y, phi_y, targets, self_cols, *, beta, tau_min, tau_max, d, impl, topk,
                  deterministic) -> torch.Tensor:
    """L_a for every row a of x [H, N, D] against the columns y [H, M, D] (φ codes alongside): the positive
    targets[a], the k hardest of the other columns (self_cols[a] excluded too)."""
    H, N, D = x.shape
    M = y.shape[1]
    k = min(topk, M - 1 - (self_cols is not None))
    cols = impl.compute_topk(x.detach(), y.detach(), targets, self_cols, k, deterministic)  # [H, N, k]

    s_pos = (x * y[:, targets]).sum(-1)  # [H, N]
    tau_pos = _tau_from_codes(phi_x, phi_y[:, targets], tau_min, tau_max).to(x.dtype)
    s_neg = indexed_dot(x, y, cols)  # [H, N, k]
    tau_neg = _tau_from_dots(indexed_dot(phi_x, phi_y, cols), tau_min, tau_max).to(x.dtype)
    return (-s_pos / tau_pos + (s_neg / tau_neg).mean(-1) + beta * omega(tau_pos, d)
            - beta * (torch.log(tau_neg) + 1.0 / tau_neg).sum(-1))


def _codes(net: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """φ(z) [H, n, P], run in φ's parameter dtype."""
    net_dtype = next((p.dtype for p in net.parameters()), z.dtype)
    phi = net(z.to(net_dtype))
    if phi.dim() != 3 or phi.shape[:2] != z.shape[:2]:
        raise ValueError(f"temperature_net must map [..., D] to [..., P]; got {tuple(phi.shape)} "
                         f"for input {tuple(z.shape)}")
    return phi


# ---------------------------------------------------------------------------------------------------------------
# The cross-modal form (the earlier default): the hardest-negative statistic of the fused kernels.

def _cross_modal_loss(x, y, temperature_net, *, beta, tau_min, tau_max, omega_dim, targets, symmetric, reduction,
                      normalize, check_finite, backend, deterministic) -> torch.Tensor:
    """L_i = −pos_i/τ⁺_i + hard_i/τ⁻_i + β Ω(τ⁺_i) − β Ω(τ⁻_i), τ⁺_i = τ(x_i, y_{t_i}), τ⁻_i = τ(x_i, y_{arg_i}), with
    pos, hard, arg from ``compute_stats`` (``StatsRequest(hard=True)``, VSE++'s statistics); symmetric: the column
    direction adds anchor y_j against its hardest row a_j, τ⁻_j = τ(x_{a_j}, y_j), and the head's loss is
    ½(mean row + mean column)."""
    if targets is not None and symmetric:
        raise ValueError("targets: a symmetric loss uses the diagonal as positives; pass symmetric=False")
    problem = validate(
        x, y, loss="max_margin", temperature=1.0, margin=0.0, hardest_negative=True, targets=targets,
        symmetric=symmetric, reduction=reduction, check_finite=check_finite, backend=backend,
        deterministic=deterministic, normalize=normalize,
    )
    impl = backends.resolve(backend, problem.x.device)
    xs, ys = problem.x, problem.y  # [H, N, D], [H, M, D]
    if normalize:
        xs, ys = F.normalize(xs, dim=-1), F.normalize(ys, dim=-1)
    stats = impl.compute_stats(xs, ys, None, problem.margin, problem.targets, problem.request)
    cdt = stats.pos.dtype
    d = float(xs.shape[-1] if omega_dim is None else omega_dim)

    phi_x, phi_y = _codes(temperature_net, xs), _codes(temperature_net, ys)  # φ on every row once
    H, N, P = phi_x.shape
    phi_pos = phi_y[:, problem.targets]  # [H, N, P]: φ(y_{t_i})
    phi_neg = phi_y.gather(1, stats.arg.unsqueeze(-1).expand(H, N, P))  # φ(y_{arg_i})
    tau_pos = _tau_from_codes(phi_x, phi_pos, tau_min, tau_max).to(cdt)
    row = _cross_modal_terms(stats.pos, stats.hard, tau_pos,
                             _tau_from_codes(phi_x, phi_neg, tau_min, tau_max).to(cdt), beta, d)
    if symmetric:  # column j: anchor y_j, positive S_jj (same pair, same τ⁺), hardest row a_j
        phi_neg_c = phi_x.gather(1, stats.arg_c.unsqueeze(-1).expand(H, N, P))  # φ(x_{a_j})
        col = _cross_modal_terms(stats.pos, stats.hard_c, tau_pos,
                                 _tau_from_codes(phi_neg_c, phi_y, tau_min, tau_max).to(cdt), beta, d)
        terms = torch.stack((row, col), dim=1)
    else:
        terms = row
    return losses.reduce_terms(terms, loss="infonce", hardest_negative=False, reduction=problem.reduction,
                               num_cols=ys.shape[1], has_heads=problem.has_heads)


def _cross_modal_terms(pos, hard, tau_pos, tau_neg, beta: float, d: float) -> torch.Tensor:
    return -pos / tau_pos + hard / tau_neg + beta * (omega(tau_pos, d) - omega(tau_neg, d))


def _tau_from_codes(a: torch.Tensor, b: torch.Tensor, tau_min: float, tau_max: float) -> torch.Tensor:
    return _tau_from_dots((a * b).sum(-1), tau_min, tau_max)


def _tau_from_dots(dots: torch.Tensor, tau_min: float, tau_max: float) -> torch.Tensor:
    """τ from ⟨φ(a), φ(b)⟩."""
    return tau_min + (tau_max - tau_min) * torch.sigmoid(-dots)


# ---------------------------------------------------------------------------------------------------------------
# Checks: every argument before anything runs, naming it.

def _check_form(form, queue) -> str:
    if form is None:
        return "moco" if queue is not None else "simclr"
    if not isinstance(form, str) or form not in FORMS:
        raise ValueError(f"unknown form {form!r}; expected one of {FORMS}")
    if form == "moco" and queue is None:
        raise ValueError("queue: form='moco' takes its negatives from a queue [K, D]; pass queue=")
    if form == "simclr" and queue is not None:
        raise ValueError("queue: form='simclr' takes its negatives from the batch; drop queue or use form='moco'")
    return form


def _check_scalars(beta, tau_min, tau_max, omega_dim) -> None:
    for name, v in (("beta", beta), ("tau_min", tau_min), ("tau_max", tau_max)):
        if isinstance(v, bool) or not isinstance(v, Real):
            raise TypeError(f"{name} must be a float, got {type(v).__name__}")
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {v!r}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if not 0 < tau_min < tau_max:
        raise ValueError(f"need 0 < tau_min < tau_max, got tau_min={tau_min}, tau_max={tau_max}")
    if omega_dim is not None and (isinstance(omega_dim, bool) or not isinstance(omega_dim, Real) or omega_dim <= 0):
        raise ValueError(f"omega_dim must be a number > 0, got {omega_dim!r}")


def _check_views(z1, z2):
    """z1, z2 as [H, B, D] with B ≥ 2, same shape, dtype and device."""
    z1_3, z2_3, has_heads = check_views(z1, z2)
    if z1_3.shape[1] < 2:
        raise ValueError(f"z1 must hold at least B = 2 samples (got B={z1_3.shape[1]}): an anchor needs a negative")
    return z1_3, z2_3, has_heads


def _check_queue(queue, q3: torch.Tensor) -> torch.Tensor:
    """queue [K, D] (shared by every head) or [H, K, D], as [H, K, D] in q's dtype and device."""
    if not isinstance(queue, torch.Tensor):
        raise TypeError(f"queue must be a torch.Tensor [K, D] or [H, K, D], got {type(queue).__name__}")
    check_tensor_layout("queue", queue)
    H, _, D = q3.shape
    if queue.dim() == 2:
        queue = queue.unsqueeze(0).expand(H, -1, -1)
    if queue.dim() != 3 or queue.shape[0] != H or queue.shape[2] != D:
        raise ValueError(f"queue must have shape [K, {D}] or [{H}, K, {D}], got {tuple(queue.shape)}")
    if queue.dtype != q3.dtype:
        raise TypeError(f"queue must have the dtype of z1 ({q3.dtype}), got {queue.dtype}")
    if queue.device != q3.device:
        raise ValueError(f"queue must be on the device of z1 ({q3.device}), got {queue.device}")
    return queue


def _check_options(reduction, backend, normalize, check_finite, deterministic) -> None:
    for name, value, choices in (("reduction", reduction, _REDUCTIONS), ("backend", backend, _BACKENDS)):
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"unknown {name} {value!r}; expected one of {choices}")
    for name, flag in (("normalize", normalize), ("check_finite", check_finite)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if deterministic is not None and not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool or None, got {type(deterministic).__name__}")
