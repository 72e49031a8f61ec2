"""AMCL: Adaptive Multi-head Contrastive Learning (Wang et al., ECCV'24), on the fused statistics (DESIGN §4, §5).

Per head h (independent projection heads, inputs [H, N, D]) and anchor i, with S = x_h y_hᵀ:

    L_i   = −pos_i/τ⁺_i + hard_i/τ⁻_i + β Ω(τ⁺_i) − β Ω(τ⁻_i)          Ω(τ) = (d/2) log τ + 1/τ
    pos_i = S_{i,t_i},  hard_i = max_{j≠t_i} S_ij,  arg_i = its column   (the hardest negative)
    τ(a, b) = τ_min + (τ_max − τ_min)·sigmoid(−⟨φ(a), φ(b)⟩)      φ: a small MLP shared across heads
    τ⁺_i = τ(x_i, y_{t_i}),   τ⁻_i = τ(x_i, y_{arg_i})

Loss = Σ_h mean_i L_i (``reduction="mean"``). Symmetric (``symmetric=True``): the column direction adds, for
anchor y_j, hard^c_j = max_{i≠j} S_ij at row a_j and τ⁻_j = τ(x_{a_j}, y_j), and the head's loss is
½(mean row + mean column).

Which embeddings feed φ: the two members of the pair, each as the head produces it — the anchor's embedding
x_i and the partner's y_j (x_i and y_j are the two "views" of a SimCLR pair; here the two modalities). The paper
learns a head-wise, pair-adaptive temperature from "the pair of feature vectors" each head produces; φ is applied
to each member and the similarity of the two codes sets τ, so similar-looking pairs get a low τ (sharp) and
dissimilar ones a high τ. Gradients flow through τ into φ's parameters *and* into x and y.

Nothing N×M is formed here: pos, hard and arg come from a backend's ``compute_stats`` (``StatsRequest(hard=True)``,
the same statistics as the VSE++ hardest-negative loss, so every fused backend serves AMCL), and φ runs on the N
anchors and M columns once (O((N+M)·D)), then τ on 2N pairs (4N symmetric).
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import backends, losses
from .validation import validate

TAU_MIN, TAU_MAX, BETA = 1e-5, 2.0, 1e-4


class AMCLTemperatureNet(nn.Module):
    """φ: Linear(dim, hidden) → ReLU → Linear(hidden, out_dim), shared across heads.

    ``temperature(a, b)`` = τ_min + (τ_max − τ_min)·sigmoid(−⟨φ(a), φ(b)⟩) for paired rows of a and b.
    """

    def __init__(self, dim: int, hidden: int = 128, out_dim: int = 64):
        super().__init__()
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
    x: torch.Tensor,
    y: torch.Tensor,
    temperature_net: nn.Module,
    *,
    beta: float = BETA,
    tau_min: float = TAU_MIN,
    tau_max: float = TAU_MAX,
    omega_dim: Optional[float] = None,
    targets: Optional[torch.Tensor] = None,
    symmetric: bool = False,
    reduction: str = "mean",
    normalize: bool = False,
    check_finite: bool = False,
    backend: str = "auto",
    deterministic: Optional[bool] = None,
) -> torch.Tensor:
    """Multi-head AMCL loss of x [H, N, D] (or [N, D], one head) against y [H, M, D] (or [M, D]).

    temperature_net:  φ, a module mapping [..., D] → [..., P] (``AMCLTemperatureNet``), shared across heads.
    beta, tau_min, tau_max:  β = 1e-4, τ ∈ (1e-5, 2) as the paper.
    omega_dim:        the d of Ω(τ) = (d/2) log τ + 1/τ; default D, the embedding size.
    targets, symmetric, reduction, normalize, check_finite, backend, deterministic:  as ``mk.contrastive_loss``
                      (default one-directional, ``symmetric=False``: row i against its positive ``targets[i]``,
                      default arange(N)). ``reduction="none"``: [H, N] ([H, 2, N] symmetric), no H without heads;
                      "mean": Σ_h mean_i L_i; "sum": Σ_h Σ_i L_i.

    Returns fp32 (fp64 for fp64 inputs).
    """
    if not isinstance(temperature_net, nn.Module):
        raise TypeError(f"temperature_net must be an nn.Module (e.g. AMCLTemperatureNet), "
                        f"got {type(temperature_net).__name__}")
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

    net_dtype = next((p.dtype for p in temperature_net.parameters()), cdt)
    phi_x = temperature_net(xs.to(net_dtype))  # [H, N, P]: φ on every anchor once
    phi_y = temperature_net(ys.to(net_dtype))  # [H, M, P]: and on every column once
    if phi_x.dim() != 3 or phi_x.shape[:2] != xs.shape[:2]:
        raise ValueError(f"temperature_net must map [..., D] to [..., P]; got {tuple(phi_x.shape)} "
                         f"for input {tuple(xs.shape)}")
    H, N, P = phi_x.shape
    phi_pos = phi_y[:, problem.targets]  # [H, N, P]: φ(y_{t_i})
    phi_neg = phi_y.gather(1, stats.arg.unsqueeze(-1).expand(H, N, P))  # φ(y_{arg_i})
    tau_pos = _tau_from_codes(phi_x, phi_pos, tau_min, tau_max).to(cdt)
    row = _terms(stats.pos, stats.hard, tau_pos, _tau_from_codes(phi_x, phi_neg, tau_min, tau_max).to(cdt),
                 beta, d)
    if symmetric:  # column j: anchor y_j, positive S_jj (same pair, same τ⁺), hardest row a_j
        phi_neg_c = phi_x.gather(1, stats.arg_c.unsqueeze(-1).expand(H, N, P))  # φ(x_{a_j})
        col = _terms(stats.pos, stats.hard_c, tau_pos,
                     _tau_from_codes(phi_neg_c, phi_y, tau_min, tau_max).to(cdt), beta, d)
        terms = torch.stack((row, col), dim=1)
    else:
        terms = row
    return losses.reduce_terms(terms, loss="infonce", hardest_negative=False, reduction=problem.reduction,
                               num_cols=ys.shape[1], has_heads=problem.has_heads)


def omega(tau: torch.Tensor, d: float) -> torch.Tensor:
    """The AMCL regularizer Ω(τ) = (d/2) log τ + 1/τ."""
    return 0.5 * d * torch.log(tau) + 1.0 / tau


class AMCLLoss(nn.Module):
    """``amcl_loss`` as a module holding the temperature network φ (an ``AMCLTemperatureNet(dim, hidden, out_dim)``
    unless ``temperature_net`` is given). ``forward(x, y, targets=None)``; optimize its parameters with the model's.
    """

    def __init__(
        self,
        dim: Optional[int] = None,
        *,
        hidden: int = 128,
        out_dim: int = 64,
        temperature_net: Optional[nn.Module] = None,
        beta: float = BETA,
        tau_min: float = TAU_MIN,
        tau_max: float = TAU_MAX,
        omega_dim: Optional[float] = None,
        symmetric: bool = False,
        reduction: str = "mean",
        normalize: bool = False,
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
        self.options = dict(beta=beta, tau_min=tau_min, tau_max=tau_max, omega_dim=omega_dim, symmetric=symmetric,
                            reduction=reduction, normalize=normalize, check_finite=check_finite, backend=backend,
                            deterministic=deterministic)

    def forward(self, x: torch.Tensor, y: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        return amcl_loss(x, y, self.temperature_net, targets=targets, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


def _tau_from_codes(a: torch.Tensor, b: torch.Tensor, tau_min: float, tau_max: float) -> torch.Tensor:
    return tau_min + (tau_max - tau_min) * torch.sigmoid(-(a * b).sum(-1))


def _terms(pos, hard, tau_pos, tau_neg, beta: float, d: float) -> torch.Tensor:
    return -pos / tau_pos + hard / tau_neg + beta * (omega(tau_pos, d) - omega(tau_neg, d))
