"""Every check of DESIGN §7, in one place, before any backend runs.

``validate`` turns the public arguments into a ``Problem``: inputs with an explicit head axis, the temperature
and margin as [H, N] tensors, explicit targets, and the statistics the loss needs. Shape and type errors raise
``TypeError``/``ValueError`` naming the argument. Checks on tensor *values* (τ > 0, targets in range, finiteness)
read the data once; they are skipped while ``torch.compile`` traces, where they would break the graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Real
from typing import Optional, Union

import torch

from .stats import StatsRequest, compute_dtype
from .temperature import DySTreSS

LOSSES = ("infonce", "max_margin")
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "torch", "triton", "cpp")
FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Problem:
    x: torch.Tensor  # [H, N, D]
    y: torch.Tensor  # [H, M, D]
    tau: Optional[torch.Tensor]  # [H, N] per-sample temperature (None: DySTreSS, or not an InfoNCE loss)
    margin: Optional[torch.Tensor]  # [H, N] per-sample margin (None: not a max-margin loss)
    targets: torch.Tensor  # [N] int64
    loss: str
    hardest_negative: bool
    symmetric: bool
    reduction: str
    has_heads: bool
    request: StatsRequest


def validate(
    x,
    y,
    *,
    loss,
    temperature,
    margin,
    hardest_negative,
    targets,
    symmetric,
    reduction,
    check_finite,
    backend,
    deterministic,
    normalize=False,
    distributed=False,
) -> Problem:
    """``distributed``: the batch is one rank's share; checks that need the global batch (M ≥ 2) are left to
    ``mmts_kernels.distributed``."""
    _check_choice("loss", loss, LOSSES)
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_choice("backend", backend, BACKENDS)
    for name, flag in (("hardest_negative", hardest_negative), ("symmetric", symmetric),
                       ("check_finite", check_finite), ("normalize", normalize)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if deterministic is not None and not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool or None, got {type(deterministic).__name__}")
    if hardest_negative and loss != "max_margin":
        raise ValueError("hardest_negative=True applies to loss='max_margin' only")

    x3, y3, has_heads = _check_embeddings(x, y)
    H, N, _ = x3.shape
    M = y3.shape[1]
    checking_values = not torch.compiler.is_compiling()

    if symmetric:
        if targets is not None:
            raise ValueError("targets: a symmetric loss uses the diagonal as positives; pass symmetric=False "
                             "to use explicit targets")
        if N != M:
            raise ValueError(f"symmetric=True needs as many rows as columns (x has N={N}, y has M={M}); "
                             "pass symmetric=False for a rectangular batch")
    if M < 2 and not distributed:
        raise ValueError(f"y must hold at least 2 samples (M={M}): every row needs a negative")
    targets = _check_targets(targets, N, M, x3.device, checking_values)

    cdt = compute_dtype(x3.dtype)
    tau = margin_t = dystress = None
    if loss == "infonce":
        if isinstance(temperature, DySTreSS):
            dystress = temperature
        else:
            tau = _per_sample("temperature", temperature, H, N, x3.device, cdt, checking_values, positive=True)
    else:
        margin_t = _per_sample("margin", margin, H, N, x3.device, cdt, checking_values, positive=False)

    if check_finite and checking_values:
        for name, t in (("x", x3), ("y", y3), ("temperature", tau), ("margin", margin_t)):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or Inf (check_finite=True)")

    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    request = StatsRequest(
        lse=loss == "infonce",
        hinge=loss == "max_margin" and not hardest_negative,
        hard=loss == "max_margin" and hardest_negative,
        ws=tau is not None and tau.requires_grad,
        cols=symmetric,
        dystress=dystress,
        deterministic=deterministic,
    )
    return Problem(x3, y3, tau, margin_t, targets, loss, hardest_negative, symmetric, reduction, has_heads, request)


def _check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {choices}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {choices}")


def _check_embeddings(x, y):
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float64, float32, bfloat16 or float16, got {t.dtype}")
        if t.dim() not in (2, 3):
            raise ValueError(f"{name} must have shape [N, D] or [H, N, D], got {tuple(t.shape)}")
    if x.dim() != y.dim():
        raise ValueError(f"x and y must both have a head axis or neither: x is {tuple(x.shape)}, "
                         f"y is {tuple(y.shape)}")
    if x.dtype != y.dtype:
        raise TypeError(f"x and y must have the same dtype, got x: {x.dtype}, y: {y.dtype}")
    if x.device != y.device:
        raise ValueError(f"x and y must be on the same device, got x: {x.device}, y: {y.device}")
    has_heads = x.dim() == 3
    x3, y3 = (x, y) if has_heads else (x.unsqueeze(0), y.unsqueeze(0))
    if x3.shape[0] != y3.shape[0]:
        raise ValueError(f"x and y must have the same number of heads H, got {x3.shape[0]} and {y3.shape[0]}")
    if x3.shape[2] != y3.shape[2]:
        raise ValueError(f"x and y must have the same embedding size D, got {x3.shape[2]} and {y3.shape[2]}")
    if x3.shape[1] < 1 or x3.shape[2] < 1 or x3.shape[0] < 1:
        raise ValueError(f"x must be non-empty, got shape {tuple(x.shape)}")
    return x3, y3, has_heads


def _check_targets(targets, N: int, M: int, device: torch.device, checking_values: bool) -> torch.Tensor:
    if targets is None:
        if N != M:
            raise ValueError(f"targets must be given when N != M (N={N}, M={M})")
        return torch.arange(N, device=device)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be an integer torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"targets must have an integer dtype, got {targets.dtype}")
    if targets.shape != (N,):
        raise ValueError(f"targets must have shape [N] = [{N}], got {tuple(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"targets must be on the device of x ({device}), got {targets.device}")
    if checking_values and N > 0:
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= M:
            raise ValueError(f"targets must lie in [0, M) = [0, {M}), got values in [{lo}, {hi}]")
    return targets.long()


def _per_sample(name: str, value: Union[float, torch.Tensor], H: int, N: int, device, cdt, checking_values,
                *, positive: bool) -> torch.Tensor:
    """A float, 0-dim, [N] or [H, N] value as an [H, N] tensor (a broadcast view: gradients sum back)."""
    rule = "finite and > 0" if positive else "finite"
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if value.device != device:
            raise ValueError(f"{name} must be on the device of x ({device}), got {value.device}")
        if value.shape not in ((), (N,), (H, N)):
            allowed = "[], [N]" + (" or [H, N]" if H > 1 else "")
            raise ValueError(f"{name} must have shape {allowed} with N={N}, H={H}; got {tuple(value.shape)}")
        cast = value.to(cdt)  # checked after the cast: 1e-50 is > 0 in fp64 but 0 in fp32
        if checking_values and cast.numel() > 0:
            ok = torch.isfinite(cast).all() & ((cast > 0).all() if positive else True)
            if not bool(ok):
                raise ValueError(f"{name} must be {rule} in {cdt}; got values in "
                                 f"[{float(value.min())}, {float(value.max())}]")
        return cast.expand(H, N)
    if isinstance(value, bool) or not isinstance(value, Real):
        kinds = "a float, a 0-dim or [N] tensor" + (" or mk.DySTreSS(...)" if positive else "")
        raise TypeError(f"{name} must be {kinds}, got {type(value).__name__}")
    value = float(value)
    cast = torch.tensor(value, dtype=torch.float64).to(cdt)  # 1e300 is finite in fp64, inf in fp32
    if not bool(torch.isfinite(cast)) or (positive and not bool(cast > 0)):
        raise ValueError(f"{name} must be {rule} in {cdt}, got {value}")
    return cast.to(device).view(1, 1).expand(H, N)
