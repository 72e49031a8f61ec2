"""Temperature and margin schedules (DESIGN §5): stateless functions of the training step.

    TS      τ(t)   = τ_min + ½(τ_max − τ_min)(1 + cos(2πt/T))                       (Kukleva et al., ICLR'23)
    MM-TS   τ_i(t) = (α/2)·cos(2πt/T) + sh(c_i),
            sh(c)  = sh_min + (n_c − n_min)/(n_max − n_min)·(sh_max − sh_min)       (sh_min if n_max = n_min)
    margin  m_i(t) = τ_i(t)                    the max-margin variant of MM-TS uses the same per-sample value
    warm-up v(t)   = start + (end − start)·min(t / W, 1)

where n_c is the training-set size of sample i's cluster: head clusters (large n_c) get a higher τ. ``n_min`` and
``n_max`` are the smallest and largest cluster sizes *of the training set*, and they are required keyword arguments:
taken from the sizes passed in, a batch's τ_i would depend on which other samples share the batch (three samples of
one cluster would all get sh_min, whatever the dataset). For the whole training set's sizes, pass their own
extremes: ``n_min=sizes.min(), n_max=sizes.max()``. ``MMTSLoss`` holds the training set's sizes and does this for
you.

``step`` is a number or a 0-dim tensor (a tensor keeps ``torch.compile`` from specializing on its value); every
function returns a float for a number and a tensor for a tensor.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional, Union

import torch

from .validation import check_tensor_layout

Step = Union[float, torch.Tensor]
SizeBound = Union[float, torch.Tensor]  # a number or a 0-dim tensor


def cosine_temperature(
    step: Step,
    tau_min: float,
    tau_max: float,
    period: Optional[float] = None,
    *,
    half_period: Optional[float] = None,
) -> Union[float, torch.Tensor]:
    """TS schedule: starts at τ_max, reaches τ_min at half a period, back to τ_max every ``period`` steps.

    Give exactly one of ``period`` (the full period T, as in DESIGN §5) or ``half_period`` (the official TS code's
    ``t_max``: τ = τ_min + ½(τ_max − τ_min)(1 + cos(π·t/t_max)), so T = 2·t_max). The official TS setting, stepped
    per epoch, is ``cosine_temperature(epoch, 0.1, 1.0, half_period=200)``.
    """
    if (period is None) == (half_period is None):
        raise ValueError("cosine_temperature: give exactly one of period (the full period) and half_period (the "
                         f"official TS code's t_max, half a period); got period={period}, half_period={half_period}")
    if half_period is not None:
        _check_period(half_period, "half_period")
        period = 2 * half_period
    _check_period(period)
    if not 0 < tau_min <= tau_max:
        raise ValueError(f"need 0 < tau_min <= tau_max, got tau_min={tau_min}, tau_max={tau_max}")
    return tau_min + 0.5 * (tau_max - tau_min) * (1.0 + _cos(2.0 * math.pi * _check_step(step) / period))


def cluster_shift(
    cluster_sizes: torch.Tensor,
    shift_min: float = 0.05,
    shift_max: float = 0.20,
    *,
    n_min: SizeBound,
    n_max: SizeBound,
) -> torch.Tensor:
    """sh(c_i): per-sample shift, linear in the size of the sample's cluster, in [shift_min, shift_max].

    float64, shape [N]. ``n_min``/``n_max``: the smallest and largest cluster sizes of the training set (numbers or
    0-dim tensors); every size in ``cluster_sizes`` must lie between them.
    """
    if not isinstance(cluster_sizes, torch.Tensor):
        cluster_sizes = torch.as_tensor(cluster_sizes)
    check_tensor_layout("cluster_sizes", cluster_sizes)
    if cluster_sizes.dim() != 1:
        raise ValueError(f"cluster_sizes must have shape [N], got {tuple(cluster_sizes.shape)}")
    if cluster_sizes.dtype == torch.bool or cluster_sizes.is_complex():
        raise TypeError(f"cluster_sizes must be a real number tensor, got {cluster_sizes.dtype}")
    if shift_max < shift_min:
        raise ValueError(f"need shift_min <= shift_max, got {shift_min} > {shift_max}")
    sizes = cluster_sizes.to(torch.float64)
    lo, hi = (_size_bound(name, v, sizes.device) for name, v in (("n_min", n_min), ("n_max", n_max)))
    span = hi - lo
    if not torch.compiler.is_compiling():
        if bool(span < 0):
            raise ValueError(f"need n_min <= n_max, got n_min={float(lo)}, n_max={float(hi)}")
        if sizes.numel() > 0 and bool((sizes.min() < lo) | (sizes.max() > hi)):
            raise ValueError(f"cluster_sizes: values in [{float(sizes.min()):g}, {float(sizes.max()):g}] lie outside "
                             f"[n_min, n_max] = [{float(lo):g}, {float(hi):g}]; n_min and n_max must be the smallest "
                             f"and largest cluster sizes of the whole training set")
    frac = torch.where(span > 0, (sizes - lo) / torch.where(span > 0, span, 1.0), 0.0)
    return shift_min + frac * (shift_max - shift_min)


def mmts_temperature(
    step: Step,
    period: float,
    cluster_sizes: torch.Tensor,
    alpha: float = 0.08,
    shift_min: float = 0.05,
    shift_max: float = 0.20,
    *,
    n_min: SizeBound,
    n_max: SizeBound,
) -> torch.Tensor:
    """MM-TS per-sample temperature τ_i(step), shape [N], float32 (float64 if cluster_sizes is float64).

    ``cluster_sizes`` [N]: the training-set cluster size of each sample (a batch's, or the whole training set's);
    ``n_min``/``n_max``: the smallest and largest cluster sizes of the whole training set (required, so that a
    sample's τ does not depend on its batch). ``period`` = total_steps / n_oscillations (the official default is 5
    oscillations). The official EK-100 run uses alpha=0.2, shift in [0.17, 0.30]; the defaults are the official
    argparse ones. τ stays > 0 as long as alpha/2 < shift_min.
    """
    _check_period(period)
    if not isinstance(alpha, Real) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite float >= 0, got {alpha!r}")
    shift = cluster_shift(cluster_sizes, shift_min, shift_max, n_min=n_min, n_max=n_max)
    base = 0.5 * alpha * _cos(2.0 * math.pi * _check_step(step) / period)
    if isinstance(base, torch.Tensor):
        base = base.to(device=shift.device, dtype=torch.float64)
    out_dtype = torch.float64 if getattr(cluster_sizes, "dtype", None) == torch.float64 else torch.float32
    return (base + shift).to(out_dtype)


def mmts_margin(
    step: Step,
    period: float,
    cluster_sizes: torch.Tensor,
    alpha: float = 0.08,
    shift_min: float = 0.05,
    shift_max: float = 0.20,
    *,
    n_min: SizeBound,
    n_max: SizeBound,
) -> torch.Tensor:
    """MM-TS per-sample margin of the max-margin variant: the same value as ``mmts_temperature`` (official code)."""
    return mmts_temperature(step, period, cluster_sizes, alpha, shift_min, shift_max, n_min=n_min, n_max=n_max)


def linear_warmup(step: Step, warmup_steps: float, start, end):
    """Linear ramp from ``start`` (step 0) to ``end`` (step ``warmup_steps`` and after).

    ``start``/``end`` are floats or tensors (e.g. ``end`` = an MM-TS [N] temperature): the result is a float
    only when all inputs are numbers. ``warmup_steps=0`` returns ``end``.
    """
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, Real) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a number >= 0, got {warmup_steps!r}")
    step = _check_step(step)
    if warmup_steps == 0:
        return end
    if isinstance(step, torch.Tensor):
        frac = torch.clamp(step.to(torch.float64) / warmup_steps, 0.0, 1.0)
        if isinstance(end, torch.Tensor):
            frac = frac.to(end.device)
        elif isinstance(start, torch.Tensor):
            frac = frac.to(start.device)
    else:
        frac = min(max(float(step) / warmup_steps, 0.0), 1.0)
    out = start + (end - start) * frac
    ref = end if isinstance(end, torch.Tensor) else start if isinstance(start, torch.Tensor) else None
    if ref is not None and isinstance(out, torch.Tensor) and ref.is_floating_point():
        out = out.to(ref.dtype)
    return out


def _check_period(period, name: str = "period") -> None:
    if isinstance(period, bool) or not isinstance(period, Real) or not math.isfinite(period) or period <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {period!r}")


def _check_step(step: Step) -> Step:
    if isinstance(step, torch.Tensor):
        check_tensor_layout("step", step)
        if step.dim() != 0:
            raise ValueError(f"step must be a number or a 0-dim tensor, got shape {tuple(step.shape)}")
        return step if step.is_floating_point() else step.to(torch.float64)
    if isinstance(step, bool) or not isinstance(step, Real):
        raise TypeError(f"step must be a number or a 0-dim tensor, got {type(step).__name__}")
    return step


def _size_bound(name: str, value, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        check_tensor_layout(name, value)
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a number or a 0-dim real tensor, got a {value.dtype} tensor of shape "
                            f"{tuple(value.shape)}")
        return value.reshape(()).to(device=device, dtype=torch.float64)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number (a cluster size of the training set), got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return torch.tensor(float(value), dtype=torch.float64, device=device)


def _cos(v):
    return torch.cos(v) if isinstance(v, torch.Tensor) else math.cos(v)
