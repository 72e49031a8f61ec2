"""Temperature schedules (DESIGN §5): stateless functions of the training step.

    TS     τ(t)   = τ_min + ½(τ_max − τ_min)(1 + cos(2πt/T))                       (Kukleva et al., ICLR'23)
    MM-TS  τ_i(t) = (α/2)·cos(2πt/T) + sh(c_i),
           sh(c)  = sh_min + (n_c − n_min)/(n_max − n_min)·(sh_max − sh_min)       (sh_min if all n_c are equal)

where n_c is the training-set size of sample i's cluster: head clusters (large n_c) get a higher τ.
"""
from __future__ import annotations

import math

import torch


def cosine_temperature(step: float, tau_min: float, tau_max: float, period: float) -> float:
    """TS schedule: starts at τ_max, reaches τ_min at half a period, back to τ_max every ``period`` steps."""
    if period <= 0:
        raise ValueError(f"period must be > 0, got {period}")
    if not 0 < tau_min <= tau_max:
        raise ValueError(f"need 0 < tau_min <= tau_max, got tau_min={tau_min}, tau_max={tau_max}")
    return tau_min + 0.5 * (tau_max - tau_min) * (1.0 + math.cos(2.0 * math.pi * step / period))


def cluster_shift(cluster_sizes: torch.Tensor, shift_min: float = 0.05, shift_max: float = 0.20) -> torch.Tensor:
    """sh(c_i): per-sample shift, linear in the size of the sample's cluster, in [shift_min, shift_max]."""
    if not isinstance(cluster_sizes, torch.Tensor):
        cluster_sizes = torch.as_tensor(cluster_sizes)
    if cluster_sizes.dim() != 1:
        raise ValueError(f"cluster_sizes must have shape [N], got {tuple(cluster_sizes.shape)}")
    if shift_max < shift_min:
        raise ValueError(f"need shift_min <= shift_max, got {shift_min} > {shift_max}")
    sizes = cluster_sizes.to(torch.float64)
    n_min, n_max = sizes.min(), sizes.max()
    span = n_max - n_min
    frac = torch.where(span > 0, (sizes - n_min) / torch.where(span > 0, span, 1.0), 0.0)
    return shift_min + frac * (shift_max - shift_min)


def mmts_temperature(
    step: float,
    period: float,
    cluster_sizes: torch.Tensor,
    alpha: float = 0.08,
    shift_min: float = 0.05,
    shift_max: float = 0.20,
) -> torch.Tensor:
    """MM-TS per-sample temperature τ_i(step), shape [N], float32 (float64 if cluster_sizes is float64).

    ``period`` = total_steps / n_oscillations (the official default is 5 oscillations).
    """
    if period <= 0:
        raise ValueError(f"period must be > 0, got {period}")
    base = 0.5 * alpha * math.cos(2.0 * math.pi * step / period)
    tau = base + cluster_shift(cluster_sizes, shift_min, shift_max)
    out_dtype = torch.float64 if getattr(cluster_sizes, "dtype", None) == torch.float64 else torch.float32
    return tau.to(out_dtype)
