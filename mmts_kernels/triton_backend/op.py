"""The fused statistics as torch.library ops, so autograd, torch.compile and opcheck see real operators.

    mmts_kernels::triton_stats(x, y, tau?, margin?, targets, <request flags>, bias?, labels?) -> 14 tensors, the
        ``Stats`` fields
    mmts_kernels::triton_stats_backward(x, y, tau?, margin?, targets, saved, grads, flags, needs, bias?, labels?)
        -> dx, dy, dτ, dm, db

Both are opaque to the compiler (custom ops with fake implementations); ``register_autograd`` connects them.
Fields a request leaves out come back as empty tensors (an op has a fixed number of outputs); ``compute_stats``
turns them into None. The request travels as plain bool/float arguments: τ and margins stay runtime tensors, the
DySTreSS bounds runtime floats, so nothing recompiles per value. ``ws`` and ``ws_c`` only feed the backward
(∂lse/∂τ) and are marked non-differentiable; ``cnt`` and ``arg`` are integers. The label
switch travels as an int (0: none, 1: "mask", 2: "positive"), the labels as two int64 tensors.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..first_order import first_order_only
from ._compat import fix_interpreter_index, interpret_triton_stdlib

fix_interpreter_index()  # before any kernel runs; a no-op unless TRITON_INTERPRET=1 and NumPy ≥ 2.4
interpret_triton_stdlib()  # a no-op unless TRITON_INTERPRET=1 was set after triton was imported

from . import backward as _backward_mod  # noqa: E402
from . import forward as _forward_mod  # noqa: E402

FIELDS = ("pos", "lse", "hinge", "cnt", "hard", "arg", "ws", "lse_c", "hinge_c", "cnt_c", "hard_c", "arg_c", "ws_c",
          "sig")


@dataclass(frozen=True)
class Config:
    """Tiles: BLOCK_N rows × BLOCK_M columns per S tile (powers of two ≥ 16, tl.dot's minimum), BLOCK_D features
    per tl.dot step, ``num_stages`` of software pipelining over D. ``merge_block``: entries per merge program.
    ``bwd_panel_factor``: the backward's ∂L/∂S panel holds about factor·(N + M)·D elements (more: fewer,
    larger GEMMs and less traffic on dx's accumulator; less: less memory)."""

    block_n: int = 128
    block_m: int = 64
    block_d: int = 64
    num_warps: int = 8
    num_stages: int = 3
    merge_block: int = 256
    bwd_panel_factor: int = 1
    panel_blocks: int = 0  # column blocks per panel, forward and backward; 0: automatic (``panel_width``)


# GPU: 16-bit and fp32 inputs feed the tensor cores with 128×64 tiles; fp64 (DMMA, 8-byte accumulators) smaller.
GPU_CONFIG = Config()
GPU_CONFIG_FP64 = Config(block_n=32, block_m=32, block_d=32, num_warps=4, num_stages=2)
# The interpreter runs every program one after the other in numpy: small tiles keep the tests' multi-tile paths
# (partial merges, several panels, several D steps) busy at small N.
INTERPRETER_CONFIG = Config(block_n=16, block_m=16, block_d=16, num_warps=1, num_stages=1, merge_block=16)
_override: Optional[Config] = None


@contextlib.contextmanager
def tile_config(cfg: Config):
    """Use ``cfg`` for every launch inside the block (tests: force several tiles, panels and D steps)."""
    global _override
    previous, _override = _override, cfg
    try:
        yield
    finally:
        _override = previous


@functools.lru_cache(maxsize=8)
def _parse_config(spec: str, base: Config) -> Config:
    """``MMTS_KERNELS_TRITON_CONFIG="block_n=64,num_warps=4"``: fields of ``Config`` over the default, for tuning
    sweeps on a GPU without editing code (opt-in; the pinned default keeps runs and compile times predictable)."""
    fields = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, value = item.partition("=")
        if name not in Config.__dataclass_fields__ or not value.strip().isdigit():
            raise ValueError(f"MMTS_KERNELS_TRITON_CONFIG: expected name=integer with name one of "
                             f"{', '.join(Config.__dataclass_fields__)}, got {item!r}")
        fields[name] = int(value)
    return replace(base, **fields)


def _config(x: Tensor) -> Config:
    if _override is not None:
        return _override
    if x.device.type != "cuda":
        return INTERPRETER_CONFIG
    base = GPU_CONFIG_FP64 if x.dtype == torch.float64 else GPU_CONFIG
    spec = os.environ.get("MMTS_KERNELS_TRITON_CONFIG")
    return _parse_config(spec, base) if spec else base


def _on_device(x: Tensor):
    """Triton launches on the current CUDA device and stream: make that x's device (a custom op gets no guard)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _flags(lse, hinge, hard, ws, cols, dystress, tau_min, tau_max, decoupled=False, dys_grad=False, sigmoid=False,
           same_label=0):
    return dict(lse=lse, hinge=hinge, hard=hard, ws=ws, cols=cols, dystress=dystress, tau_min=tau_min,
                tau_max=tau_max, decoupled=decoupled, dys_grad=dys_grad, sigmoid=sigmoid,
                same_label=same_label)


_StatsTuple = Tuple[(Tensor,) * len(FIELDS)]


@torch.library.custom_op("mmts_kernels::triton_stats", mutates_args=())
def triton_stats(x: Tensor, y: Tensor, tau: Optional[Tensor], margin: Optional[Tensor], targets: Tensor,
                 lse: bool, hinge: bool, hard: bool, ws: bool, cols: bool, dystress: bool,
                 tau_min: float, tau_max: float, deterministic: bool, self_cols: Optional[Tensor] = None,
                 decoupled: bool = False, dys_grad: bool = False, bias: Optional[Tensor] = None,
                 labels_x: Optional[Tensor] = None, labels_y: Optional[Tensor] = None, sigmoid: bool = False,
                 same_label: int = 0) -> _StatsTuple:
    with _on_device(x):
        return _forward_mod.launch_forward(
            x, y, tau, margin, targets,
            **_flags(lse, hinge, hard, ws, cols, dystress, tau_min, tau_max, decoupled, dys_grad, sigmoid,
                     same_label),
            deterministic=deterministic, cfg=_config(x), self_cols=self_cols, bias=bias, labels_x=labels_x,
            labels_y=labels_y)


@triton_stats.register_fake
def _(x, y, tau, margin, targets, lse, hinge, hard, ws, cols, dystress, tau_min, tau_max, deterministic,
      self_cols=None, decoupled=False, dys_grad=False, bias=None, labels_x=None, labels_y=None, sigmoid=False,
      same_label=0):
    H, N, M = x.shape[0], x.shape[1], y.shape[1]
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32

    def out(on, n=N, dtype=cdt):
        return x.new_empty((H, n) if on else (0,), dtype=dtype)

    i64 = torch.int64
    return (out(True), out(lse), out(hinge), out(hinge, dtype=i64), out(hard), out(hard, dtype=i64),
            out(lse and ws), out(cols and lse, M), out(cols and hinge, M), out(cols and hinge, M, i64),
            out(cols and hard, M), out(cols and hard, M, i64), out(cols and lse and ws, M), out(sigmoid))


@torch.library.custom_op("mmts_kernels::triton_stats_backward", mutates_args=())
def triton_stats_backward(x: Tensor, y: Tensor, tau: Optional[Tensor], margin: Optional[Tensor], targets: Tensor,
                          saved: List[Tensor], grads: List[Optional[Tensor]],
                          lse: bool, hinge: bool, hard: bool, ws: bool, cols: bool, dystress: bool,
                          tau_min: float, tau_max: float,
                          need_x: bool, need_y: bool, need_tau: bool, need_margin: bool,
                          self_cols: Optional[Tensor] = None, decoupled: bool = False, dys_grad: bool = False,
                          bias: Optional[Tensor] = None, labels_x: Optional[Tensor] = None,
                          labels_y: Optional[Tensor] = None, sigmoid: bool = False, same_label: int = 0,
                          need_bias: bool = False
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    with _on_device(x):
        grads_out = _backward_mod.launch_backward(
            x, y, tau, margin, targets, dict(zip(FIELDS, saved)), dict(zip(FIELDS, grads)),
            **_flags(lse, hinge, hard, ws, cols, dystress, tau_min, tau_max, decoupled, dys_grad, sigmoid,
                     same_label),
            need_x=need_x, need_y=need_y, need_tau=need_tau, need_margin=need_margin, cfg=_config(x),
            self_cols=self_cols, bias=bias, labels_x=labels_x, labels_y=labels_y, need_bias=need_bias)
    # an op's outputs must not alias: a fresh empty tensor for each gradient not computed
    return tuple(grad if grad is not None else x.new_empty(0) for grad in grads_out)


@triton_stats_backward.register_fake
def _(x, y, tau, margin, targets, saved, grads, lse, hinge, hard, ws, cols, dystress, tau_min, tau_max,
      need_x, need_y, need_tau, need_margin, self_cols=None, decoupled=False, dys_grad=False, bias=None,
      labels_x=None, labels_y=None, sigmoid=False, same_label=0, need_bias=False):
    def like(t, on):
        return t.new_empty(t.shape) if on and t is not None else x.new_empty(0)

    return like(x, need_x), like(y, need_y), like(tau, need_tau), like(margin, need_margin), like(bias, need_bias)


# triton_stats' trailing defaults: self_cols, decoupled, dys_grad, bias, labels_x, labels_y, sigmoid, same_label
_OP_DEFAULTS = (None, False, False, None, None, None, False, 0)
_BIAS = 17  # bias's position among the op's inputs


def _setup_context(ctx, inputs, output):
    ctx.num_inputs = len(inputs)  # backward returns one gradient per input the op was called with
    inputs = tuple(inputs) + _OP_DEFAULTS[len(inputs) - 14:]
    x, y, tau, margin, targets, lse, hinge, hard, ws, cols, dystress, tau_min, tau_max, _, self_cols, decoupled, \
        dys_grad, bias, labels_x, labels_y, sigmoid, same_label = inputs
    ctx.flags = _flags(lse, hinge, hard, ws, cols, dystress, tau_min, tau_max, decoupled, dys_grad, sigmoid,
                       same_label)
    ctx.has_tau, ctx.has_margin, ctx.has_bias = tau is not None, margin is not None, bias is not None
    ctx.save_for_backward(x, y, tau, margin, targets, self_cols, bias, labels_x, labels_y, *output)
    ctx.mark_non_differentiable(output[FIELDS.index("ws")], output[FIELDS.index("ws_c")])


def _stats_backward(ctx, *grads):
    x, y, tau, margin, targets, self_cols, bias, labels_x, labels_y, *saved = ctx.saved_tensors
    need_x, need_y, need_tau, need_margin = ctx.needs_input_grad[:4]
    need_tau, need_margin = need_tau and ctx.has_tau, need_margin and ctx.has_margin
    need_bias = ctx.has_bias and ctx.num_inputs > _BIAS and ctx.needs_input_grad[_BIAS]
    dx = dy = dtau = dmargin = dbias = None
    if need_x or need_y or need_tau or need_margin or need_bias:
        dx, dy, dtau, dmargin, dbias = torch.ops.mmts_kernels.triton_stats_backward(
            x, y, tau, margin, targets, saved, list(grads), **ctx.flags,
            need_x=need_x, need_y=need_y, need_tau=need_tau, need_margin=need_margin, self_cols=self_cols,
            bias=bias, labels_x=labels_x, labels_y=labels_y, need_bias=need_bias)
    out = [(dx if need_x else None), (dy if need_y else None), (dtau if need_tau else None),
           (dmargin if need_margin else None)] + [None] * (ctx.num_inputs - 4)
    if need_bias:
        out[_BIAS] = dbias
    return tuple(out)


# First order only, as cpp: a second differentiation gets the library's message (mmts_kernels.first_order).
triton_stats.register_autograd(first_order_only(_stats_backward, "triton"), setup_context=_setup_context)
