"""open_clip's ``ClipLoss`` and ``SigLipLoss`` (open_clip/loss.py) as drop-in classes computed by the fused
``mk.info_nce`` and ``mk.sigmoid_loss``.

ClipLoss
--------

One process, N pairs (x_i = image_features[i], y_j = text_features[j]), s = logit_scale, the scale open_clip's
ClipLoss receives (already exp'd: ``model.logit_scale.exp()``):

    L = ½ · [ mean_i CE(s · x_i Yᵀ, i) + mean_j CE(s · y_j Xᵀ, j) ]

This is the symmetric InfoNCE of ``mk.info_nce`` with the one temperature τ = 1/s; autograd carries ∂L/∂s through
the reciprocal. A scalar ``logit_bias`` b shifts every logit of a row alike and softmax cancels it, so L does not
depend on b and ∂L/∂b = 0 (open_clip's own gradient is 0 up to rounding); b still receives that zero gradient, so
a model that holds it as a parameter sees it used, as under open_clip.

Distributed: world_size W > 1, this process is rank r of torch.distributed's default group, n local pairs per rank
(open_clip needs them equal), N = W·n. Let L_single be the loss of one process on the concatenated batch, and
L_r = ½ · (sum of rank r's row and column terms) / n: rank r's anchors scored against every gathered candidate.
Each combination of open_clip's flags gives, on every rank, the value below and the gradients that a backward of
it leaves in x_r, y_r and s (before DDP averages parameter gradients over the ranks):

    local_loss gather_with_grad  value     ∂/∂x_r, ∂/∂y_r       ∂/∂s           computed here as
    True       True              L_r       W · ∂L_single/∂x_r   ∂L_r/∂s        mk.info_nce(process_group=WORLD)
    False      True              L_single  W · ∂L_single/∂x_r   ∂L_single/∂s   the same; value, ∂/∂s averaged
    False      False             L_single  ∂L_single/∂x_r       ∂L_single/∂s   the same; also ∂/∂x_r, ∂/∂y_r ÷ W
    True       False             L_r       only the direct terms of the local anchors         refused (ValueError)

(The gathered features' gradients are summed over the ranks, so Σ_r' L_r' = W · L_single drives x_r; without
gather_with_grad open_clip puts the local features, with grad, into the global matrix, which drives x_r by L_single
only.) The first row is mk's distributed path as it is: each rank scores only its own anchors against the N gathered
candidates (streamed by the fused backends; open_clip's global loss builds all N×N logits on every rank). The next
two run the same path, and one scalar all-reduce in the forward turns the value into the mean over ranks of L_r,
which is L_single, and one in the backward averages ∂L_r/∂s over the ranks, which is ∂L_single/∂s; without
gather_with_grad the features' gradients are divided by W. After DDP's averaging, the first two rows train every
parameter with the gradient of L_single; the third gives the towers 1/W of it and s all of it, as open_clip does.
The last row's gradient drops every gathered candidate's term (local_loss needs gather_with_grad, as discussed in
open_clip#616), so it is refused.

These equalities hold when every rank back-propagates the same upstream gradient (as ``loss.backward()`` or a loss
weight does); every rank must call the loss and its backward. Unequal local batches, which open_clip cannot
gather, work here: with local_loss=True the value is then mk's (``mk.info_nce`` with ``process_group``, whose
mean over ranks is L_single) rather than the local mean, and the rest of the table holds as written.

SigLipLoss
----------
One process, N pairs, s = logit_scale (exp'd, as above), b = logit_bias (0 when None), z_ij = +1 if i = j else −1:

    L = −(1/N) Σ_i Σ_j log σ(z_ij · (s · x_i·y_j + b))

which is ``mk.sigmoid_loss`` with τ = 1/s and bias b; autograd carries ∂L/∂s through the reciprocal and ∂L/∂b as
it is.

Distributed: rank r of W holds n pairs (X_r, Y_r). open_clip's value on rank r is its own anchors X_r against every
rank's texts, divided by the local batch (each dist_impl — "bidir", "shift", "reduce", "gather" — moves the text
blocks differently and computes the same sum):

    L_r = −(1/n) Σ_{i ∈ r} Σ_{j over all N} log σ(z_ij (s x_i·y_j + b))

The text blocks travel with their gradients, so a backward on every rank leaves in X_r and Y_r the gradient of
Σ_r' L_r' = W · L_single (L_single: one process on the concatenated batch), and in s and b this rank's own
∂L_r/∂s, ∂L_r/∂b, whose mean over the ranks (DDP's averaging) is L_single's. ``mk.sigmoid_loss`` with
``process_group`` returns exactly L_r when the local batches are equal (its rule: the mean over ranks of the values
is L_single; the y blocks go around the ring, gradients back through it), so every dist_impl is that one call.
Unequal local batches, which open_clip's exchange cannot send, work here: the value is then mk's (the mean over
ranks still L_single), and the gradients are as stated. As with open_clip, every rank must call the loss and its
backward (both pass blocks around the ring); the gradients reaching Y_r are those of each rank's own upstream
gradient, as open_clip's exchange returns them.
"""
from __future__ import annotations

from numbers import Real
from typing import Optional

import torch
from torch import nn

from ..api import info_nce, sigmoid_loss
from ..temperature import MAX_TEMPERATURE
from ..validation import BACKENDS


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss``: the same constructor and call, the loss from ``mk.info_nce``.

    local_loss, gather_with_grad, rank, world_size:  open_clip's distributed flags (see the module docstring for
                       what each combination computes); rank and world_size must be those of torch.distributed's
                       default group when world_size > 1. local_loss=True needs gather_with_grad=True.
    cache_labels:      accepted; there are no labels to cache (the positives are the diagonal, never materialized).
    use_horovod:       must be False: horovod is not supported (use torch.distributed).
    backend:           mk's backend ("auto" | "torch" | "cpp" | "triton"), an extra keyword.

    ``forward(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)``: features [N, D];
    logit_scale the exp'd scale 1/τ (a number or a one-element tensor, may require grad), at least
    1 / MAX_TEMPERATURE; logit_bias None, a number or a one-element tensor. Returns the scalar loss, or
    ``{"contrastive_loss": loss}`` with output_dict=True.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        backend: str = "auto",
    ):
        super().__init__()
        for name, flag in (("local_loss", local_loss), ("gather_with_grad", gather_with_grad),
                           ("cache_labels", cache_labels), ("use_horovod", use_horovod)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        _check_rank(rank, world_size)
        if use_horovod:
            raise ValueError("use_horovod=True: horovod is not supported by this ClipLoss; run data-parallel with "
                             "torch.distributed (its default process group is used) and use_horovod=False")
        if world_size > 1 and local_loss and not gather_with_grad:
            raise ValueError("local_loss=True with gather_with_grad=False: the gathered features carry no gradient, "
                             "so every candidate's term is dropped from the gradient and it is not the gradient "
                             "of any contrastive loss (open_clip#616); pass gather_with_grad=True (with "
                             "local_loss=True it is the gradient of one process on the whole batch)")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.backend = backend

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        if not isinstance(output_dict, bool):
            raise TypeError(f"output_dict must be a bool, got {type(output_dict).__name__}")
        _check_features(image_features, text_features)
        tau = _temperature(logit_scale, image_features.dtype, "ClipLoss")
        if self.world_size == 1:
            loss = info_nce(image_features, text_features, temperature=tau, backend=self.backend)
        else:
            loss = self._distributed(image_features, text_features, tau)
        if isinstance(logit_bias, torch.Tensor):
            loss = loss + _zero_with_gradient(logit_bias).to(loss.dtype)
        else:
            _check_bias_number(logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss

    def _distributed(self, x: torch.Tensor, y: torch.Tensor, tau):
        group = _default_group(self.rank, self.world_size)
        if self.local_loss:  # with gather_with_grad: mk's distributed loss as it is
            return info_nce(x, y, temperature=tau, backend=self.backend, process_group=group)
        # The global loss of open_clip on every rank, from this rank's share of it.
        if isinstance(tau, torch.Tensor) and tau.requires_grad:
            tau = _AverageGradOverRanks.apply(tau, group)
        if not self.gather_with_grad:
            x = _ScaleGrad.apply(x, 1.0 / self.world_size)
            y = _ScaleGrad.apply(y, 1.0 / self.world_size)
        local = info_nce(x, y, temperature=tau, backend=self.backend, process_group=group)
        return _MeanValueOverRanks.apply(local, group)

    def extra_repr(self) -> str:
        return (f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, rank={self.rank}, "
                f"world_size={self.world_size}, backend={self.backend!r}")


class SigLipLoss(nn.Module):
    """open_clip's ``SigLipLoss``: the same constructor and call, the loss from ``mk.sigmoid_loss``.

    rank, world_size:  open_clip's distributed arguments; with world_size > 1 they must be those of torch.distributed's
                       default group, and the loss runs ``mk.sigmoid_loss`` over it (see the module docstring).
    dist_impl:         open_clip's choice of exchange (None = "bidir", "shift", "reduce", "gather"): each computes
                       the same loss and gradients, here all by mk's ring exchange of the text blocks.
    cache_labels:      accepted; there are no labels to cache (the ±1 targets are never materialized).
    chunk_size:        accepted (open_clip's main branch added it to bound the logits' memory): an int ≥ 0, unused,
                       as the fused loss never holds the logits.
    backend:           mk's backend ("auto" | "torch" | "cpp" | "triton"), an extra keyword.

    ``forward(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)``: features [N, D];
    logit_scale the exp'd scale 1/τ (a number or a one-element tensor, may require grad), at least
    1 / MAX_TEMPERATURE; logit_bias None (no bias), a number or a one-element tensor (may require grad). Returns the
    scalar loss, or ``{"contrastive_loss": loss}`` with output_dict=True.
    """

    DIST_IMPLS = ("bidir", "shift", "reduce", "gather")

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: Optional[str] = None,
        chunk_size: int = 0,
        *,
        backend: str = "auto",
    ):
        super().__init__()
        if not isinstance(cache_labels, bool):
            raise TypeError(f"cache_labels must be a bool, got {type(cache_labels).__name__}")
        _check_rank(rank, world_size)
        if dist_impl is not None and dist_impl not in self.DIST_IMPLS:
            raise ValueError(f"dist_impl must be None or one of {self.DIST_IMPLS} (open_clip's exchanges), got "
                             f"{dist_impl!r}")
        _check_int("chunk_size", chunk_size, low=0)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or "bidir"  # open_clip's default
        self.chunk_size = chunk_size
        self.backend = backend

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        if not isinstance(output_dict, bool):
            raise TypeError(f"output_dict must be a bool, got {type(output_dict).__name__}")
        _check_features(image_features, text_features)
        tau = _temperature(logit_scale, image_features.dtype, "SigLipLoss")
        bias = _bias(logit_bias, image_features.dtype)
        group = _default_group(self.rank, self.world_size) if self.world_size > 1 else None
        loss = sigmoid_loss(image_features, text_features, temperature=tau, bias=bias, backend=self.backend,
                            process_group=group)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, world_size={self.world_size}, dist_impl={self.dist_impl!r}, "
                f"backend={self.backend!r}")


# ---------------------------------------------------------------------------------------------------------------
# Arguments.

def _check_int(name: str, value, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check_rank(rank, world_size) -> None:
    _check_int("world_size", world_size, low=1)
    _check_int("rank", rank, low=0)
    if rank >= world_size:
        raise ValueError(f"rank must lie in [0, world_size) = [0, {world_size}), got {rank}")


def _check_features(image_features, text_features) -> None:
    # mk checks dtypes, devices and D (naming them x and y); the shape rules of open_clip's call are checked here.
    for name, t in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be [N, D] (one embedding per row), got shape {tuple(t.shape)}")
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f"image_features and text_features must hold the same number of pairs, got "
                         f"{image_features.shape[0]} and {text_features.shape[0]}")


def _temperature(logit_scale, features_dtype: torch.dtype, owner: str):
    """τ = 1/logit_scale: a float, or a 0-dim tensor that carries the gradient back to ``logit_scale``.

    The reciprocal is taken in float64 when the features or the scale are float64, else in float32: open_clip
    multiplies float64 logits by the exact value of a float32 scale, and 1/s rounded to float32 would be 6e-8 off.
    ``owner``, the class, is named in the error for a scale that looks like a temperature."""
    if isinstance(logit_scale, torch.Tensor):
        if not logit_scale.is_floating_point():
            raise TypeError(f"logit_scale must be a floating-point tensor, got {logit_scale.dtype}")
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must be a number or a one-element tensor (open_clip passes "
                             f"model.logit_scale.exp(), 0-dim), got shape {tuple(logit_scale.shape)}")
        scale = logit_scale.reshape(())
        wide = torch.float64 if torch.float64 in (scale.dtype, features_dtype) else torch.float32
        tau = scale.to(wide).reciprocal()
        if not torch.compiler.is_compiling() and scale.device.type != "meta":
            # One device sync for every rule; the second look, to say which one failed, only on the error path.
            if not bool(torch.isfinite(scale) & (scale > 0) & (tau <= MAX_TEMPERATURE)):
                _raise_bad_scale(float(scale), owner)
        return tau
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, Real):
        raise TypeError(f"logit_scale must be a number or a one-element tensor, got {type(logit_scale).__name__}")
    scale = float(logit_scale)
    if not (scale > 0 and scale < float("inf") and 1.0 / scale <= MAX_TEMPERATURE):
        _raise_bad_scale(scale, owner)
    return 1.0 / scale


def _raise_bad_scale(scale: float, owner: str) -> None:
    if not (0 < scale < float("inf")):
        raise ValueError(f"logit_scale must be finite and > 0, got {scale}")
    init = "10 for SigLIP" if owner == "SigLipLoss" else "≈ 14.3 for CLIP"
    raise ValueError(f"logit_scale = {scale:g} is below {1 / MAX_TEMPERATURE:g} (a temperature 1/logit_scale above "
                     f"{MAX_TEMPERATURE:g}): it looks like a temperature τ, but {owner} takes open_clip's exp'd "
                     f"logit scale 1/τ (model.logit_scale.exp(), {init} at init, at most 100); pass 1/τ")


def _bias(logit_bias, features_dtype: torch.dtype):
    """b for ``mk.sigmoid_loss``: 0.0 for None (open_clip then adds no bias), a float, or a 0-dim tensor that carries
    the gradient back to ``logit_bias``, in float64 when the features or the bias are (as for τ)."""
    if logit_bias is None:
        return 0.0
    if isinstance(logit_bias, torch.Tensor):
        _check_bias_tensor(logit_bias)
        wide = torch.float64 if torch.float64 in (logit_bias.dtype, features_dtype) else torch.float32
        return logit_bias.reshape(()).to(wide)
    _check_bias_number(logit_bias)
    return float(logit_bias)


def _zero_with_gradient(logit_bias: torch.Tensor) -> torch.Tensor:
    """0, with ∂/∂logit_bias = 0: the loss's exact dependence on a scalar bias, which softmax cancels."""
    _check_bias_tensor(logit_bias)
    return (logit_bias * 0).sum()


def _check_bias_tensor(logit_bias: torch.Tensor) -> None:
    if not logit_bias.is_floating_point():
        raise TypeError(f"logit_bias must be a floating-point tensor, got {logit_bias.dtype}")
    if logit_bias.numel() != 1:
        raise ValueError(f"logit_bias must be None, a number or a one-element tensor (one bias for every logit, "
                         f"as open_clip's models hold), got shape {tuple(logit_bias.shape)}")


def _check_bias_number(logit_bias) -> None:
    if logit_bias is not None and (isinstance(logit_bias, bool) or not isinstance(logit_bias, Real)):
        raise TypeError(f"logit_bias must be None, a number or a one-element tensor, got "
                        f"{type(logit_bias).__name__}")


# ---------------------------------------------------------------------------------------------------------------
# torch.distributed: the default group, and the three small autograd pieces of the global-loss settings.

def _default_group(rank: int, world_size: int):
    import torch.distributed as dist  # only touched when asked for

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"world_size={world_size}: torch.distributed is not initialized; call "
                         "torch.distributed.init_process_group first (or pass world_size=1)")
    if dist.get_world_size() != world_size:
        raise ValueError(f"world_size={world_size}, but torch.distributed's default group has "
                         f"{dist.get_world_size()} processes")
    if dist.get_rank() != rank:
        raise ValueError(f"rank={rank}, but this process is rank {dist.get_rank()} of torch.distributed's default "
                         "group")
    return dist.group.WORLD


class _MeanValueOverRanks(torch.autograd.Function):
    """Forward: the mean over ranks of a scalar; backward: the gradient passes to this rank's own term unchanged."""

    @staticmethod
    def forward(ctx, local, group):
        import torch.distributed as dist

        total = local.detach().clone()
        dist.all_reduce(total, group=group)
        return total / dist.get_world_size(group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _AverageGradOverRanks(torch.autograd.Function):
    """Identity forward; backward: the mean over ranks of the gradient (a replicated value sees every rank's term)."""

    @staticmethod
    def forward(ctx, value, group):
        ctx.group = group
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        total = grad.clone()
        dist.all_reduce(total, group=ctx.group)
        return total / dist.get_world_size(ctx.group), None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward: the gradient times ``factor``."""

    @staticmethod
    def forward(ctx, value, factor):
        ctx.factor = factor
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None
