"""Every check of DESIGN §7, in one place, before any backend runs.

``validate`` turns the public arguments into a ``Problem``: inputs with an explicit head axis, the temperature
and margin as [H, N] tensors, explicit targets, and the statistics the loss needs. Shape and type errors raise
``TypeError``/``ValueError`` naming the argument. Every tensor must be dense and strided (sparse, mkldnn and
nested tensors are refused: the kernels index raw strides). Checks on tensor *values* (0 < τ ≤ MAX_TEMPERATURE,
targets in range, finiteness) read the data once, in one device sync per tensor; they are skipped while
``torch.compile`` traces, where they would break the graph, and on meta tensors, which have no values.
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Real
from typing import Optional, Union

import torch

from .stats import StatsRequest, compute_dtype
from .temperature import MAX_TEMPERATURE, DySTreSS, logit_scale_message

LOSSES = ("infonce", "max_margin", "sigmoid")
SAME_LABEL = ("positive", "ignore")
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "torch", "triton", "cpp")
FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Problem:
    x: torch.Tensor  # [H, N, D]
    y: torch.Tensor  # [H, M, D]
    tau: Optional[torch.Tensor]  # [H, N] per-sample temperature (None: DySTreSS, or a max-margin loss)
    margin: Optional[torch.Tensor]  # [H, N] per-sample margin (None: not a max-margin loss)
    targets: torch.Tensor  # [N] int64
    loss: str
    hardest_negative: bool
    symmetric: bool  # both directions (InfoNCE, max-margin); the sigmoid loss is one sum over all pairs: False
    reduction: str
    has_heads: bool
    request: StatsRequest
    bias: Optional[torch.Tensor] = None  # [H, N] per-sample bias of the sigmoid loss
    labels: Optional[tuple] = None  # (labels_x [N], labels_y [M]) int64, or None
    same_label: Optional[str] = None  # "positive" | "ignore" when labels are given


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
    bias=None,
    labels=None,
    same_label="positive",
) -> Problem:
    """``distributed``: the batch is one rank's share; checks that need the global batch (M ≥ 2) are left to
    ``mmts_kernels.distributed``. ``bias``: the sigmoid loss's (ignored by the others, which refuse it upstream)."""
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
    on_meta = x3.device.type == "meta"
    if check_finite and on_meta:
        raise ValueError("check_finite=True reads the values of x and y, but they are meta tensors (shapes only, no "
                         "values); pass check_finite=False")
    checking_values = not torch.compiler.is_compiling() and not on_meta

    if symmetric:
        if targets is not None:
            raise ValueError("targets: a symmetric loss uses the diagonal as positives; pass symmetric=False "
                             "to use explicit targets")
        if N != M:
            raise ValueError(f"symmetric=True needs as many rows as columns (x has N={N}, y has M={M}); "
                             "pass symmetric=False for a rectangular batch")
    if M < 2 and not distributed and loss != "sigmoid":  # the sigmoid loss is defined on a single pair
        raise ValueError(f"y must hold at least 2 samples (M={M}): every row needs a negative")
    targets = _check_targets(targets, N, M, x3.device, checking_values)
    _check_choice("same_label", same_label, SAME_LABEL)
    label_pair = check_labels(labels, N, M, x3.device, checking_values, targets=targets)

    cdt = compute_dtype(x3.dtype)
    tau = margin_t = dystress = bias_t = None
    if loss == "max_margin":
        margin_t = _per_sample("margin", margin, H, N, x3.device, cdt, checking_values, positive=False)
    else:
        tau, dystress = check_temperature(temperature, H, N, x3.device, cdt, checking_values)
    if loss == "sigmoid":
        if dystress is not None:
            raise ValueError("temperature: the sigmoid loss takes a float or a per-sample tensor, not DySTreSS "
                             "(its τ(S) is defined for the softmax of InfoNCE)")
        bias_t = _per_sample("bias", bias, H, N, x3.device, cdt, checking_values, positive=False)
    _check_supcon_temperature(label_pair, same_label, dystress)

    if check_finite and checking_values:
        for name, t in (("x", x3), ("y", y3), ("temperature", tau), ("margin", margin_t), ("bias", bias_t)):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or Inf (check_finite=True)")

    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    sigmoid = loss == "sigmoid"
    request = StatsRequest(
        lse=loss == "infonce",
        hinge=loss == "max_margin" and not hardest_negative,
        hard=loss == "max_margin" and hardest_negative,
        ws=loss == "infonce" and tau is not None and tau.requires_grad,
        cols=symmetric and not sigmoid,
        dystress=dystress,
        deterministic=deterministic,
        sigmoid=sigmoid,
        same_label=kernel_same_label(loss, same_label) if label_pair is not None else None,
    )
    return Problem(x3, y3, tau, margin_t, targets, loss, hardest_negative, symmetric and not sigmoid, reduction,
                   has_heads, request, bias=bias_t, labels=label_pair,
                   same_label=same_label if label_pair is not None else None)


def kernel_same_label(loss: str, same_label: str, decoupled: bool = False) -> Optional[str]:
    """What the statistics do with same-label columns (``StatsRequest.same_label``) for a loss's ``same_label``:
    "ignore" masks them out of every statistic. "positive": the sigmoid loss counts them as positives; InfoNCE
    keeps them in the lse and averages them in the numerator outside the kernels (``losses.label_positive_mean``),
    unless decoupled (DCL drops every positive from the denominator, i.e. masks them); max-margin never takes them
    as negatives."""
    if same_label == "ignore":
        return "mask"
    if loss == "sigmoid":
        return "positive"
    if loss == "infonce" and not decoupled:
        return None
    return "mask"


def _check_supcon_temperature(label_pair, same_label: str, dystress) -> None:
    if label_pair is not None and same_label == "positive" and dystress is not None:
        raise ValueError("same_label='positive' averages S_ip/τ_i over the positives, which needs a per-sample "
                         "temperature; with DySTreSS pass same_label='ignore'")


def check_labels(labels, N: int, M: int, device, checking_values: bool, *, targets: Optional[torch.Tensor],
                 name: str = "labels"):
    """``labels``: None, an [N] integer tensor (square batches: rows and columns share it), or a pair
    (labels_x [N], labels_y [M]). Returns (labels_x, labels_y) as int64, or None. With ``targets`` every row's
    target column must carry the row's label (it is one of the row's positives)."""
    if labels is None:
        return None
    if isinstance(labels, torch.Tensor):
        if N != M:
            raise ValueError(f"{name}: one [N] tensor labels a square batch; x has N={N} rows and y M={M}, so pass a "
                             f"pair ({name}_x [N], {name}_y [M])")
        pair = (labels, labels)
    elif isinstance(labels, (tuple, list)) and len(labels) == 2:
        pair = tuple(labels)
    else:
        raise TypeError(f"{name} must be an integer tensor [N] or a pair of them ([N], [M]), got "
                        f"{type(labels).__name__}")
    out = []
    for part, t, size in zip(("x", "y"), pair, (N, M)):
        what = name if pair[0] is pair[1] else f"{name} ({part} side)"
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what} must be an integer torch.Tensor, got {type(t).__name__}")
        check_tensor_layout(what, t)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{what} must have an integer dtype (class ids), got {t.dtype}")
        if t.shape != (size,):
            raise ValueError(f"{what} must have shape [{size}], got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{what} must be on the device of x ({device}), got {t.device}")
        out.append(t.long())
    lx, ly = out
    if checking_values and targets is not None and N > 0:
        bad = lx != ly[targets]
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"{name}: row {i}'s target column {int(targets[i])} has label {int(ly[targets[i]])}, "
                             f"not the row's {int(lx[i])}; a row's target is one of its positives")
    return lx, ly


def check_tensor_layout(name: str, t: torch.Tensor) -> None:
    """A dense, strided tensor, as every backend reads it. Sparse (COO, CSR, …), mkldnn and nested tensors would
    otherwise fail inside torch or a kernel with an error that names no argument."""
    if t.is_nested:  # checked first: a nested tensor's layout may read torch.strided
        raise TypeError(f"{name} must be a dense tensor, got a nested (ragged) tensor; pass an ordinary dense "
                        "tensor (rows added as padding would count as samples)")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; convert it with "
                        f"{name}.to_dense()")


def check_temperature(temperature, H: int, N: int, device, cdt, checking_values: bool):
    """The ``temperature`` argument of an InfoNCE-type loss: ``(tau, None)`` with tau an [H, N] tensor in ``cdt``,
    or ``(None, dystress)`` for a ``DySTreSS``. Every τ must be finite, > 0 in ``cdt`` and at most
    ``MAX_TEMPERATURE`` (a larger one is a logit scale passed by mistake)."""
    if isinstance(temperature, DySTreSS):
        check_dystress(temperature, cdt)
        return None, temperature
    return _per_sample("temperature", temperature, H, N, device, cdt, checking_values, positive=True,
                       upper=MAX_TEMPERATURE), None


def check_dystress(dystress: DySTreSS, cdt: torch.dtype) -> None:
    """DySTreSS checks its bounds (finite, > 0, ≤ MAX_TEMPERATURE) when it is made, before the inputs' dtype is
    known; here they must also hold in the compute dtype (τ_min = 1e-50 is > 0 in fp64 but 0 in fp32)."""
    for name in ("tau_min", "tau_max"):
        _scalar_in_dtype(f"temperature (DySTreSS {name})", getattr(dystress, name), cdt, positive=True)


def _check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {choices}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {choices}")


def check_embedding_tensor(name: str, t, rows: str = "N") -> None:
    """A dense floating tensor of shape [rows, D] or [H, rows, D]; TypeError/ValueError naming ``name``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_tensor_layout(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float64, float32, bfloat16 or float16, got {t.dtype}")
    if t.dim() not in (2, 3):
        raise ValueError(f"{name} must have shape [{rows}, D] or [H, {rows}, D], got {tuple(t.shape)}")


def _check_same_dtype_device(first, second) -> None:
    """Two (name, tensor) pairs that must share a dtype (TypeError) and a device (ValueError)."""
    (a_name, a), (b_name, b) = first, second
    if a.dtype != b.dtype:
        raise TypeError(f"{a_name} and {b_name} must have the same dtype, got {a_name}: {a.dtype}, {b_name}: {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{a_name} and {b_name} must be on the same device, got {a_name}: {a.device}, "
                         f"{b_name}: {b.device}")


def _check_embeddings(x, y):
    for name, t in (("x", x), ("y", y)):
        check_embedding_tensor(name, t)
    if x.dim() != y.dim():
        raise ValueError(f"x and y must both have a head axis or neither: x is {tuple(x.shape)}, "
                         f"y is {tuple(y.shape)}")
    _check_same_dtype_device(("x", x), ("y", y))
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
    check_tensor_layout("targets", targets)
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
                *, positive: bool, upper: Optional[float] = None) -> torch.Tensor:
    """A float, 0-dim, [N] or [H, N] value as an [H, N] tensor (a broadcast view: gradients sum back).

    Values must be finite in ``cdt`` (and > 0 if ``positive``); above ``upper`` a temperature is a logit scale."""
    if isinstance(value, torch.Tensor):
        check_tensor_layout(name, value)
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if value.device != device:
            raise ValueError(f"{name} must be on the device of x ({device}), got {value.device}")
        if value.shape not in ((), (N,), (H, N)):
            allowed = "[], [N]" + (" or [H, N]" if H > 1 else "")
            raise ValueError(f"{name} must have shape {allowed} with N={N}, H={H}; got {tuple(value.shape)}")
        cast = value.to(cdt)  # checked after the cast: 1e-50 is > 0 in fp64 but 0 in fp32
        if checking_values and cast.numel() > 0:
            _check_values(name, value, cast, cdt, positive, upper)
        return cast.expand(H, N)
    if isinstance(value, bool) or not isinstance(value, Real):
        kinds = "a float, a 0-dim or [N] tensor" + (" or mk.DySTreSS(...)" if positive else "")
        raise TypeError(f"{name} must be {kinds}, got {type(value).__name__}")
    cast = _scalar_in_dtype(name, value, cdt, positive=positive)
    if upper is not None and float(value) > upper:
        raise ValueError(logit_scale_message(name, float(value)))
    return cast.to(device).view(1, 1).expand(H, N)


def _check_values(name: str, value: torch.Tensor, cast: torch.Tensor, cdt, positive: bool,
                  upper: Optional[float]) -> None:
    # One reduction and one device sync for every rule together (a learnable τ is checked on every call); the
    # second look, to say which rule failed, only runs on the error path.
    ok = torch.isfinite(cast).all()
    if positive:
        ok = ok & (cast > 0).all()
    if upper is not None:
        ok = ok & (cast <= upper).all()
    if bool(ok):
        return
    if upper is not None and bool(torch.isfinite(cast).all() & (cast > 0).all()):
        raise ValueError(logit_scale_message(f"{name} (its largest element)", float(cast.detach().max())))
    raise ValueError(f"{name} must be {_rule(positive)} in {cdt}; got values in "
                     f"[{float(value.detach().min())}, {float(value.detach().max())}]")


def _scalar_in_dtype(name: str, value: Real, cdt, *, positive: bool) -> torch.Tensor:
    """A Python number as a 0-dim CPU tensor of ``cdt``, finite (and > 0) after the cast."""
    value = float(value)
    cast = torch.tensor(value, dtype=torch.float64).to(cdt)  # 1e300 is finite in fp64, inf in fp32
    if not bool(torch.isfinite(cast)) or (positive and not bool(cast > 0)):
        raise ValueError(f"{name} must be {_rule(positive)} in {cdt}, got {value}")
    return cast


def _rule(positive: bool) -> str:
    return "finite and > 0" if positive else "finite"


# ---------------------------------------------------------------------------------------------------------------
# NT-Xent (SimCLR): two views of one batch.

@dataclass(frozen=True)
class NTXentProblem:
    z1: torch.Tensor  # [H, B, D] first view
    z2: torch.Tensor  # [H, B, D] second view
    tau: Optional[torch.Tensor]  # [H, 2B] per-anchor temperature (None: DySTreSS); anchors of z1, then of z2
    reduction: str
    has_heads: bool
    request: StatsRequest
    labels: Optional[torch.Tensor] = None  # [B] int64 class of each sample (both views share it), or None
    same_label: Optional[str] = None  # "positive" | "ignore" when labels are given


def validate_nt_xent(z1, z2, *, temperature, decoupled, reduction, normalize, backend, deterministic,
                     distributed=False, labels=None, same_label="positive") -> NTXentProblem:
    """The arguments of ``mk.nt_xent``. ``temperature``: a float, 0-dim, [B] per sample (both views of sample i use
    τ_i), [2B] per anchor (z1's anchors, then z2's), [H, B] / [H, 2B], or ``DySTreSS``. ``distributed``: B is this
    rank's share; the global B ≥ 2 is checked by ``mmts_kernels.distributed``."""
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_choice("backend", backend, BACKENDS)
    for name, flag in (("decoupled", decoupled), ("normalize", normalize)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if deterministic is not None and not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool or None, got {type(deterministic).__name__}")
    z1, z2, has_heads = check_views(z1, z2)
    H, B, _ = z1.shape
    if B < 2 and not distributed:
        raise ValueError(f"z1 and z2 must hold at least 2 samples (B={B}): a view's anchor needs a negative "
                         "besides its own other view")
    on_meta = z1.device.type == "meta"
    checking_values = not torch.compiler.is_compiling() and not on_meta
    cdt = compute_dtype(z1.dtype)
    tau, dystress = check_temperature(_per_anchor(temperature, H, B), H, 2 * B, z1.device, cdt, checking_values)
    _check_choice("same_label", same_label, SAME_LABEL)
    if isinstance(labels, (tuple, list)):
        raise TypeError("labels: nt_xent takes one [B] tensor, the class of each sample (both views share it)")
    pair = check_labels(labels, B, B, z1.device, checking_values, targets=None)
    if pair is not None and decoupled and checking_values and not distributed and bool((pair[0] == pair[0][0]).all()):
        raise ValueError("labels: with decoupled=True every anchor needs a negative of another class, but all B "
                         "samples share one label (the loss would be log 0)")
    _check_supcon_temperature(pair, same_label, dystress)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    request = StatsRequest(lse=True, ws=tau is not None and tau.requires_grad, dystress=dystress,
                           deterministic=deterministic, decoupled=decoupled,
                           same_label=kernel_same_label("infonce", same_label, decoupled) if pair else None)
    return NTXentProblem(z1, z2, tau, reduction, has_heads, request, labels=pair[0] if pair else None,
                         same_label=same_label if pair else None)


def check_views(z1, z2):
    """Two views z1, z2 of one batch ([B, D] or [H, B, D], same shape, dtype and device), as [H, B, D] each, and
    whether they had a head axis. Used by ``nt_xent`` and AMCL's SimCLR form."""
    for name, t in (("z1", z1), ("z2", z2)):
        check_embedding_tensor(name, t, rows="B")
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 are two views of the same batch and must have the same shape, got z1: "
                         f"{tuple(z1.shape)}, z2: {tuple(z2.shape)}")
    _check_same_dtype_device(("z1", z1), ("z2", z2))
    if z1.numel() == 0:
        raise ValueError(f"z1 must be non-empty, got shape {tuple(z1.shape)}")
    has_heads = z1.dim() == 3
    return (z1, z2, has_heads) if has_heads else (z1.unsqueeze(0), z2.unsqueeze(0), has_heads)


def _per_anchor(temperature, H: int, B: int):
    """A per-sample [B] / [H, B] temperature repeated for both views ([2B] / [H, 2B]: anchor i and B + i share
    τ_i); every other value as given (its shape is checked against 2B next)."""
    if not isinstance(temperature, torch.Tensor) or temperature.dim() == 0:
        return temperature
    if temperature.shape in ((B,), (H, B)):
        return torch.cat((temperature, temperature), dim=-1)  # gradients of both anchors sum into τ_i
    if temperature.shape not in ((2 * B,), (H, 2 * B)):
        raise ValueError(f"temperature must be a float, 0-dim, [B] (per sample) or [2B] (per anchor) tensor, or "
                         f"[H, B] / [H, 2B] with heads, with B={B}, H={H}; got {tuple(temperature.shape)}")
    return temperature
