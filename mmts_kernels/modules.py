"""Loss modules in the ``torch.nn`` style: thin holders of a schedule or a temperature around ``contrastive_loss``.

    ContrastiveLoss   InfoNCE / max-margin with a fixed temperature (float, tensor or ``DySTreSS``) or a learnable
                      one, parameterized as open_clip does: logit_scale = log(1/τ) is the parameter, τ =
                      exp(−logit_scale) with its full gradient, and the parameter is clamped in place to
                      [0, log(max_logit_scale)] (open_clip clamps after each optimizer step; here at the next
                      forward), so 1/max_logit_scale ≤ τ ≤ 1.
    MMTSLoss          MM-TS: per-sample value v_i(t) = (α/2)·cos(2πt/T) + sh(c_i), the temperature of InfoNCE or
                      the margin of max-margin, from the training-set size of each sample's cluster. The shifts
                      sh(c_i) of the whole training set are precomputed into a buffer (min/max over the training
                      set, not the batch) and looked up with the dataset indices of the batch. Optional linear
                      warm-up blends a start value into the schedule: v(t) = s + (v_i(t) − s)·min(t/W, 1).

    SigmoidLoss       SigLIP's sigmoid loss (``mk.sigmoid_loss``) with open_clip's learnable parameters: logit_scale =
                      log(1/τ) and logit_bias, initialized to log 10 and −10 (τ = 0.1), the scale clamped like
                      ContrastiveLoss's.

All are stateless in the step (it is passed at call time) and forward ``process_group`` to the loss.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional, Union

import torch
from torch import nn

from . import schedules
from .api import contrastive_loss, sigmoid_loss
from .clusters import Clusters
from .temperature import MAX_TEMPERATURE, DySTreSS, logit_scale_message
from .validation import check_tensor_layout


class ContrastiveLoss(nn.Module):
    """``contrastive_loss`` as a module, with an optional learnable temperature.

    temperature:            float, 0-dim or [N] tensor (kept as a buffer), or ``mk.DySTreSS(...)``.
    learnable_temperature:  learn a scalar τ through ``logit_scale`` = log(1/τ) (an ``nn.Parameter`` initialized
                            from ``temperature``, which must lie in [1/max_logit_scale, 1]), clamped in place to
                            [0, log(max_logit_scale)] at each forward, as open_clip clamps after each step.
    max_logit_scale:        the clamp of 1/τ (100, as CLIP / open_clip).
    Every other argument is the one of ``mk.contrastive_loss`` (``process_group`` and ``same_label`` included).

    ``forward(x, y, targets=None, labels=None)`` returns the loss (``labels``: as ``mk.contrastive_loss``).
    """

    def __init__(
        self,
        temperature: Union[float, torch.Tensor, DySTreSS] = 0.07,
        *,
        learnable_temperature: bool = False,
        max_logit_scale: float = 100.0,
        loss: str = "infonce",
        margin: Union[float, torch.Tensor] = 0.2,
        hardest_negative: bool = False,
        symmetric: bool = True,
        reduction: str = "mean",
        normalize: bool = False,
        check_finite: bool = False,
        backend: str = "auto",
        deterministic: Optional[bool] = None,
        process_group=None,
        same_label: str = "positive",
    ):
        super().__init__()
        if not isinstance(learnable_temperature, bool):
            raise TypeError(f"learnable_temperature must be a bool, got {type(learnable_temperature).__name__}")
        self.max_logit_scale = _check_max_logit_scale(max_logit_scale)
        self._dystress: Optional[DySTreSS] = None
        self._fixed: Optional[float] = None
        self.logit_scale: Optional[nn.Parameter] = None
        self.register_buffer("_temperature", None)
        if learnable_temperature:
            if loss != "infonce":
                raise ValueError(f"learnable_temperature: loss={loss!r} uses no temperature (only 'infonce' does)")
            if isinstance(temperature, DySTreSS):
                raise ValueError("learnable_temperature=True learns one scalar temperature (open_clip's logit_scale), "
                                 "but temperature=mk.DySTreSS(...) is a per-pair function of the similarity with "
                                 "nothing to learn: pass a float (the initial τ) to learn it, or "
                                 "learnable_temperature=False to use DySTreSS")
            self.logit_scale = _logit_scale_parameter(temperature, self.max_logit_scale)
        elif isinstance(temperature, DySTreSS):
            self._dystress = temperature
        elif isinstance(temperature, torch.Tensor):
            check_tensor_layout("temperature", temperature)
            if temperature.dim() > 1:
                raise ValueError(f"temperature must be a float, a 0-dim or [N] tensor, got {tuple(temperature.shape)}")
            self._temperature = temperature.detach().clone()
        else:
            self._fixed = _scalar_temperature(temperature, learnable=False)
        if isinstance(margin, torch.Tensor):
            check_tensor_layout("margin", margin)
            self.register_buffer("_margin", margin.detach().clone())
        else:
            self.register_buffer("_margin", None)
            self._margin_value = margin
        self.options = dict(loss=loss, hardest_negative=hardest_negative, symmetric=symmetric, reduction=reduction,
                            normalize=normalize, check_finite=check_finite, backend=backend,
                            deterministic=deterministic, same_label=same_label)
        self.process_group = process_group

    @property
    def temperature(self) -> Union[float, torch.Tensor, DySTreSS]:
        """The temperature passed to the loss (a differentiable 0-dim tensor when learnable)."""
        if self.logit_scale is not None:
            return torch.exp(-self.logit_scale)
        if self._dystress is not None:
            return self._dystress
        return self._temperature if self._temperature is not None else self._fixed

    @property
    def margin(self) -> Union[float, torch.Tensor]:
        return self._margin if self._margin is not None else self._margin_value

    def forward(self, x: torch.Tensor, y: torch.Tensor, targets: Optional[torch.Tensor] = None,
                labels=None) -> torch.Tensor:
        if self.logit_scale is not None:
            _clamp_logit_scale(self.logit_scale, self.max_logit_scale)
        return contrastive_loss(x, y, temperature=self.temperature, margin=self.margin, targets=targets,
                                labels=labels, process_group=self.process_group, **self.options)

    def extra_repr(self) -> str:
        tau = "learnable" if self.logit_scale is not None else repr(self.temperature if self._temperature is None
                                                                    else "tensor")
        return f"temperature={tau}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class SigmoidLoss(nn.Module):
    """``mk.sigmoid_loss`` as a module, learnable as open_clip's SigLIP models learn it.

    temperature, bias:  the initial τ (a float in [1/max_logit_scale, 1]) and bias (a float); with
                        ``learnable=False`` fixed values instead: floats, 0-dim or [N] tensors (kept as buffers).
    learnable:          ``logit_scale`` = log(1/τ) and ``logit_bias`` are ``nn.Parameter``s (open_clip's SigLIP
                        initialization is the default: logit_scale = log 10, logit_bias = −10); logit_scale is
                        clamped in place to [0, log(max_logit_scale)] at each forward.
    Every other argument is the one of ``mk.sigmoid_loss``.

    ``forward(x, y, targets=None, labels=None)`` returns the loss.
    """

    def __init__(
        self,
        temperature: Union[float, torch.Tensor] = 0.1,
        bias: Union[float, torch.Tensor] = -10.0,
        *,
        learnable: bool = True,
        max_logit_scale: float = 100.0,
        same_label: str = "positive",
        reduction: str = "mean",
        normalize: bool = False,
        check_finite: bool = False,
        backend: str = "auto",
        deterministic: Optional[bool] = None,
        process_group=None,
    ):
        super().__init__()
        if not isinstance(learnable, bool):
            raise TypeError(f"learnable must be a bool, got {type(learnable).__name__}")
        self.max_logit_scale = _check_max_logit_scale(max_logit_scale)
        self.logit_scale: Optional[nn.Parameter] = None
        self.logit_bias: Optional[nn.Parameter] = None
        if learnable:
            if isinstance(bias, bool) or not isinstance(bias, Real) or not math.isfinite(bias):
                raise ValueError(f"bias: a learnable bias starts from a finite float, got {bias!r}")
            self.logit_scale = _logit_scale_parameter(temperature, self.max_logit_scale)
            self.logit_bias = nn.Parameter(torch.tensor(float(bias)))
            self._fixed = None
        else:
            for name, value in (("temperature", temperature), ("bias", bias)):
                if isinstance(value, torch.Tensor):
                    check_tensor_layout(name, value)
                    if value.dim() > 1:
                        raise ValueError(f"{name} must be a float, a 0-dim or [N] tensor, got {tuple(value.shape)}")
            self._fixed = (temperature.detach().clone() if isinstance(temperature, torch.Tensor) else temperature,
                           bias.detach().clone() if isinstance(bias, torch.Tensor) else bias)
        self.options = dict(same_label=same_label, reduction=reduction, normalize=normalize,
                            check_finite=check_finite, backend=backend, deterministic=deterministic)
        self.process_group = process_group

    @property
    def temperature(self) -> Union[float, torch.Tensor]:
        """τ as the loss gets it (a differentiable 0-dim tensor when learnable)."""
        return torch.exp(-self.logit_scale) if self.logit_scale is not None else self._fixed[0]

    @property
    def bias(self) -> Union[float, torch.Tensor]:
        return self.logit_bias if self.logit_bias is not None else self._fixed[1]

    def forward(self, x: torch.Tensor, y: torch.Tensor, targets: Optional[torch.Tensor] = None,
                labels=None) -> torch.Tensor:
        if self.logit_scale is not None:
            _clamp_logit_scale(self.logit_scale, self.max_logit_scale)
        return sigmoid_loss(x, y, self.temperature, self.bias, targets=targets, labels=labels,
                            process_group=self.process_group, **self.options)

    def extra_repr(self) -> str:
        values = "learnable" if self.logit_scale is not None else "fixed"
        return f"{values}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())


def _check_max_logit_scale(value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not (math.isfinite(value) and value >= 1):
        raise ValueError(f"max_logit_scale must be a finite number >= 1, got {value!r}")
    return float(value)


def _logit_scale_parameter(temperature, max_logit_scale: float) -> nn.Parameter:
    """open_clip's learnable log(1/τ), from an initial τ in [1/max_logit_scale, 1]."""
    tau = _scalar_temperature(temperature)
    if not 1.0 / max_logit_scale <= tau <= 1.0:
        raise ValueError(f"temperature: a learnable temperature must start in [1/max_logit_scale, 1] = "
                         f"[{1.0 / max_logit_scale:g}, 1], got {tau:g}")
    return nn.Parameter(torch.tensor(math.log(1.0 / tau)))


def _clamp_logit_scale(logit_scale: nn.Parameter, max_logit_scale: float) -> None:
    """open_clip's clamp of the parameter after each step (here before its use; its gradient stays alive)."""
    with torch.no_grad():
        logit_scale.clamp_(0.0, math.log(max_logit_scale))


class MMTSLoss(nn.Module):
    """MM-TS loss: InfoNCE with per-sample temperatures, or max-margin with per-sample margins, on a schedule.

    cluster_sizes:    [num_samples] training-set size of the cluster of every training sample (a ``Clusters``
                      from ``clusters_from_labels`` / ``kmeans`` works too); indexed by dataset index.
    total_steps / period:  one of them: the cosine period is T = total_steps / n_oscillations, or ``period``.
    n_oscillations:   5, as the official code.
    alpha, shift_min, shift_max:  the schedule (official argparse defaults; the EK-100 run used 0.2, 0.17, 0.30).
    loss:             "infonce" (the value is the temperature) or "max_margin" (the value is the margin).
    warmup_steps, warmup_start:  optional linear warm-up from ``warmup_start`` into the schedule.
    hardest_negative, symmetric, reduction, normalize, check_finite, backend, deterministic, process_group,
    same_label:       forwarded to ``mk.contrastive_loss``.

    ``forward(x, y, *, step, index=None, targets=None, labels=None)``: ``index`` [N] are the dataset indices of the
    batch (may be omitted only when the batch is the whole dataset in order). ``step`` is a number or a 0-dim tensor.
    ``labels``: the batch's classes (e.g. the cluster ids behind ``cluster_sizes``), as ``mk.contrastive_loss``.
    """

    def __init__(
        self,
        cluster_sizes: Union[torch.Tensor, Clusters],
        *,
        total_steps: Optional[int] = None,
        period: Optional[float] = None,
        n_oscillations: int = 5,
        alpha: float = 0.08,
        shift_min: float = 0.05,
        shift_max: float = 0.20,
        loss: str = "infonce",
        warmup_steps: int = 0,
        warmup_start: Optional[float] = None,
        hardest_negative: bool = False,
        symmetric: bool = True,
        reduction: str = "mean",
        normalize: bool = False,
        check_finite: bool = False,
        backend: str = "auto",
        deterministic: Optional[bool] = None,
        process_group=None,
        same_label: str = "positive",
    ):
        super().__init__()
        if isinstance(cluster_sizes, Clusters):
            cluster_sizes = cluster_sizes.sizes
        if not isinstance(cluster_sizes, torch.Tensor):
            raise TypeError(f"cluster_sizes must be a tensor [num_samples] or a Clusters, "
                            f"got {type(cluster_sizes).__name__}")
        check_tensor_layout("cluster_sizes", cluster_sizes)
        if cluster_sizes.dim() != 1 or cluster_sizes.numel() == 0:
            raise ValueError(f"cluster_sizes must have shape [num_samples], got {tuple(cluster_sizes.shape)}")
        if cluster_sizes.is_floating_point() and not bool(torch.isfinite(cluster_sizes).all()):
            raise ValueError("cluster_sizes must be finite")
        if bool((cluster_sizes < 0).any()):
            raise ValueError("cluster_sizes must be >= 0")
        if (total_steps is None) == (period is None):
            raise ValueError("give exactly one of total_steps (period = total_steps / n_oscillations) and period")
        if period is None:
            for name, v in (("total_steps", total_steps), ("n_oscillations", n_oscillations)):
                if isinstance(v, bool) or not isinstance(v, Real) or not v > 0:
                    raise ValueError(f"{name} must be a number > 0, got {v!r}")
            period = total_steps / n_oscillations
        if not isinstance(loss, str) or loss not in ("infonce", "max_margin"):
            raise ValueError(f"unknown loss {loss!r}; expected one of ('infonce', 'max_margin')")
        if warmup_steps and warmup_start is None:
            raise ValueError("warmup_start is required when warmup_steps > 0")
        self.period, self.alpha = period, alpha
        self.shift_min, self.shift_max = shift_min, shift_max
        self.warmup_steps, self.warmup_start = warmup_steps, warmup_start
        self.loss = loss
        # The shift of every training sample, normalized by the training set's own extremes; this also validates
        # period, alpha and the shifts once, at construction.
        extremes = dict(n_min=cluster_sizes.min(), n_max=cluster_sizes.max())
        schedules.mmts_temperature(0, period, cluster_sizes[:1], alpha, shift_min, shift_max, **extremes)
        schedules.linear_warmup(0, warmup_steps, 0.0, 0.0)
        self.register_buffer("cluster_sizes", cluster_sizes.detach().clone())
        self.register_buffer("shift", schedules.cluster_shift(cluster_sizes, shift_min, shift_max, **extremes).float())
        self.options = dict(hardest_negative=hardest_negative, symmetric=symmetric, reduction=reduction,
                            normalize=normalize, check_finite=check_finite, backend=backend,
                            deterministic=deterministic, same_label=same_label)
        self.process_group = process_group

    @property
    def num_samples(self) -> int:
        return self.shift.shape[0]

    def values(self, step, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The per-sample temperature (infonce) or margin (max_margin) at ``step``, [len(index)] (all if None)."""
        shift = self.shift if index is None else self.shift[self._check_index(index)]
        base = 0.5 * self.alpha * schedules._cos(2.0 * math.pi * schedules._check_step(step) / self.period)
        if isinstance(base, torch.Tensor):
            base = base.to(device=shift.device, dtype=shift.dtype)
        value = base + shift
        if self.warmup_steps:
            value = schedules.linear_warmup(step, self.warmup_steps, self.warmup_start, value)
        return value

    def forward(self, x: torch.Tensor, y: torch.Tensor, *, step, index: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None, labels=None) -> torch.Tensor:
        if index is None:
            n = x.shape[-2] if isinstance(x, torch.Tensor) and x.dim() >= 2 else None
            if n != self.num_samples:
                raise ValueError(f"index (the dataset indices of the batch, [N]) is required unless the batch is "
                                 f"the whole dataset ({self.num_samples} samples), got a batch of {n}")
        value = self.values(step, index)
        if isinstance(x, torch.Tensor):
            value = value.to(x.device)
        kw = {"temperature": value} if self.loss == "infonce" else {"margin": value}
        return contrastive_loss(x, y, loss=self.loss, targets=targets, labels=labels,
                                process_group=self.process_group, **kw, **self.options)

    def _check_index(self, index) -> torch.Tensor:
        if not isinstance(index, torch.Tensor):
            raise TypeError(f"index must be an integer tensor [N] of dataset indices, got {type(index).__name__}")
        check_tensor_layout("index", index)
        if index.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"index must have an integer dtype, got {index.dtype}")
        if index.dim() != 1:
            raise ValueError(f"index must have shape [N], got {tuple(index.shape)}")
        if not torch.compiler.is_compiling() and index.numel() > 0:
            lo, hi = int(index.min()), int(index.max())
            if lo < 0 or hi >= self.num_samples:
                raise ValueError(f"index must lie in [0, {self.num_samples}) (the dataset size given by "
                                 f"cluster_sizes), got values in [{lo}, {hi}]")
        return index.to(self.shift.device).long()

    def extra_repr(self) -> str:
        return (f"num_samples={self.num_samples}, loss={self.loss!r}, period={self.period}, alpha={self.alpha}, "
                f"shift=[{self.shift_min}, {self.shift_max}], warmup_steps={self.warmup_steps}")


def _scalar_temperature(value, learnable: bool = True) -> float:
    """One τ as a float: the initial value of a learnable temperature, or a fixed float."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"temperature: learnable_temperature=True learns one scalar τ, got a tensor of shape "
                             f"{tuple(value.shape)}; per-sample temperatures are not learned by this module")
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, Real):
        kinds = "a float or a 0-dim tensor (the initial τ)" if learnable else \
            "a float, a 0-dim or [N] tensor or mk.DySTreSS(...)"
        raise TypeError(f"temperature must be {kinds}, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {value}")
    if value > MAX_TEMPERATURE:
        raise ValueError(logit_scale_message("temperature", value))
    return value
