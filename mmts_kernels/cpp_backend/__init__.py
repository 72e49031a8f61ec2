"""The ``cpp`` backend: the statistics of ``mmts_kernels.stats`` from a fused, tiled, multi-threaded C++ kernel.

csrc/mmts_cpu.cpp streams S = x yᵀ in BR×BC tiles (one BLAS call per tile into a per-thread buffer), reduces each
tile in place to the running row (and column) statistics, and never holds anything O(N·M); the backward
recomputes the tiles and accumulates dx = dS·y and dy = dSᵀ·x per tile with BLAS. It is registered as the
operators ``torch.ops.mmts_kernels.cpu_stats`` / ``cpu_stats_backward``; this module adds their fake (meta)
kernels and the autograd formula, so the op is differentiable w.r.t. x, y, tau and margin and visible to
torch.compile:

    ∂/∂x, ∂/∂y    from cpu_stats_backward (tiles recomputed; the pos and −cnt·g^hinge terms join dS at (i, t_i),
                  the hardest-negative terms are gathered outside the tiles)
    ∂/∂tau_i      −g^lse_i · ws_i/τ_i² − g^lse_c_i · ws^c_i/τ_i²      (ws is computed when τ requires grad)
    self_cols, decoupled (row direction): excluded entries get no probability mass and dS = 0; DySTreSS with
                  detach=False: the kernel's dS uses ∂(S/τ(S))/∂S = 1/τ − S·τ'(S)/τ²
    ∂/∂margin_i   g^hinge_i · cnt_i + g^hinge_c_i · cnt^c_i

The gradient of the ``ws`` fields themselves is not propagated (they exist for this backward only). The backward
is first order only: differentiating its gradients again raises a RuntimeError (``mmts_kernels.first_order``).

The extension is compiled on first use (see ``_build``): the first call of ``unavailable_reason`` or
``compute_stats`` in a fresh environment takes about a minute, later processes load the cached library.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..compile_support import assume_constant_result
from ..first_order import first_order_only
from ..stats import Stats, StatsRequest, compute_dtype
from . import _build

FIELDS = Stats._fields  # pos, lse, hinge, cnt, hard, arg, ws, lse_c, hinge_c, cnt_c, hard_c, arg_c, ws_c
_INT_FIELDS = ("cnt", "arg", "cnt_c", "arg_c")


def _block_sizes() -> tuple[int, int]:
    """Tile shape BR×BC (rows × columns of S); MMTS_KERNELS_CPP_BLOCK="256x256" overrides it (for tuning)."""
    spec = os.environ.get("MMTS_KERNELS_CPP_BLOCK", "")
    if spec:
        r, c = spec.lower().split("x")
        return int(r), int(c)
    return 256, 256


def unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """None when the backend runs here (CPU tensors); else why not. Builds the extension on the first call."""
    if device is not None and torch.device(device).type != "cpu":
        return f"the cpp backend runs on CPU tensors only, not {torch.device(device).type}; use backend='triton'"
    reason = _build.load()
    if reason is None:
        _register_python_parts()
    return reason


def instruction_set() -> str:
    """Which build of the float kernels runs: "avx2" (AVX2+FMA, picked at run time when the CPU has both) or
    "portable" (CPUs without them, or MMTS_KERNELS_CPP_ISA=portable, read once per process). float64 always runs
    the portable build."""
    reason = unavailable_reason(torch.device("cpu"))
    if reason is not None:
        raise RuntimeError(f"the cpp backend cannot run: {reason}")
    return torch.ops.mmts_kernels.cpu_isa()


def compute_stats(x, y, tau, margin, targets, request: StatsRequest, self_cols=None) -> Stats:
    reason = unavailable_reason(x.device)
    if reason is not None:
        raise RuntimeError(f"the cpp backend cannot run: {reason}")
    d = request.dystress
    use_tau = request.lse and d is None
    br, bc = _block_sizes()
    out = torch.ops.mmts_kernels.cpu_stats(
        x, y, tau if use_tau else None, margin if request.hinge else None, targets,
        request.lse, request.hinge, request.hard, request.ws and use_tau, request.cols, d is not None,
        float(d.tau_min) if d is not None else 0.0, float(d.tau_max) if d is not None else 0.0,
        request.deterministic, br, bc, self_cols, request.decoupled, d is not None and not d.detach,
    )
    fields = {name: (t if t.numel() > 0 or name == "pos" else None) for name, t in zip(FIELDS, out)}
    return Stats(**fields)


# ---------------------------------------------------------------------------------------------------------------
# Fake kernels and autograd, registered once the library is loaded.

_registered = False


def _register_python_parts() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    torch.library.register_fake("mmts_kernels::cpu_stats")(_fake_stats)
    torch.library.register_fake("mmts_kernels::cpu_stats_backward")(_fake_backward)
    # First order only: a second differentiation raises instead of running through the backward kernel (zeros).
    torch.library.register_autograd("mmts_kernels::cpu_stats", first_order_only(_backward, "cpp"),
                                    setup_context=_setup_context)


def _fake_stats(x, y, tau, margin, targets, lse, hinge, hard, ws, cols, dystress, tau_min, tau_max,
                deterministic, block_rows, block_cols, self_cols=None, decoupled=False, dys_grad=False):
    H, N = x.shape[0], x.shape[1]
    cdt = compute_dtype(x.dtype)
    on = dict(pos=True, lse=lse, hinge=hinge, cnt=hinge, hard=hard, arg=hard, ws=ws and lse and not dystress)
    for name in ("lse", "hinge", "cnt", "hard", "arg", "ws"):
        on[name + "_c"] = on[name] and cols
    return tuple(
        x.new_empty((H, N) if on[name] else (0,), dtype=torch.int64 if name in _INT_FIELDS else cdt)
        for name in FIELDS
    )


def _fake_backward(x, y, tau, margin, targets, *rest):
    return torch.empty_like(x), torch.empty_like(y)


_OP_DEFAULTS = (None, False, False)  # self_cols, decoupled, dys_grad: the schema's trailing defaults


def _setup_context(ctx, inputs, output):
    ctx.num_inputs = len(inputs)  # backward returns one gradient per input the op was called with
    inputs = tuple(inputs) + _OP_DEFAULTS[len(inputs) - 16:]
    (x, y, tau, margin, targets, lse, hinge, hard, ws, cols, dystress, tau_min, tau_max, deterministic,
     block_rows, block_cols, self_cols, decoupled, dys_grad) = inputs
    out = dict(zip(FIELDS, output))
    ctx.flags = (cols, dystress, tau_min, tau_max, deterministic, block_rows, block_cols)
    ctx.row_flags = (decoupled, dys_grad)
    ctx.has_tau, ctx.has_margin = tau is not None, margin is not None
    ctx.save_for_backward(x, y, tau, margin, targets, out["pos"], out["lse"], out["lse_c"], out["cnt"],
                          out["cnt_c"], out["arg"], out["arg_c"], out["ws"], out["ws_c"], self_cols)


def _present(g) -> bool:
    return g is not None and g.numel() > 0


def _backward(ctx, *grads):
    (x, y, tau, margin, targets, pos, lse, lse_c, cnt, cnt_c, arg, arg_c, ws, ws_c, self_cols) = ctx.saved_tensors
    g = dict(zip(FIELDS, grads))
    cols, dystress, tau_min, tau_max, deterministic, block_rows, block_cols = ctx.flags

    def opt(name):
        return g[name] if _present(g[name]) else None

    dx = dy = dtau = dmargin = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        dx, dy = torch.ops.mmts_kernels.cpu_stats_backward(
            x, y, tau, margin, targets, pos, lse, lse_c, cnt, cnt_c, arg, arg_c,
            opt("pos"), opt("lse"), opt("hinge"), opt("hard"), opt("lse_c"), opt("hinge_c"), opt("hard_c"),
            cols, dystress, tau_min, tau_max, deterministic, block_rows, block_cols, self_cols, *ctx.row_flags)
    if ctx.has_tau and ctx.needs_input_grad[2]:  # ∂lse_i/∂τ_i = −ws_i/τ_i² (column j alike with τ_j)
        t = tau.to(lse.dtype)
        acc = torch.zeros_like(lse) if lse.numel() else torch.zeros(t.shape, dtype=t.dtype)
        if opt("lse") is not None:
            acc = acc - g["lse"] * ws
        if opt("lse_c") is not None:
            acc = acc - g["lse_c"] * ws_c
        dtau = (acc / (t * t)).to(tau.dtype)
    if ctx.has_margin and ctx.needs_input_grad[3]:  # ∂hinge_i/∂m_i = cnt_i
        acc = torch.zeros(margin.shape, dtype=pos.dtype)
        if opt("hinge") is not None:
            acc = acc + g["hinge"] * cnt.to(pos.dtype)
        if opt("hinge_c") is not None:
            acc = acc + g["hinge_c"] * cnt_c.to(pos.dtype)
        dmargin = acc.to(margin.dtype)
    return (dx, dy, dtau, dmargin) + (None,) * (ctx.num_inputs - 4)


# ---------------------------------------------------------------------------------------------------------------
# The top-k statistic (mmts_kernels/topk.py; csrc/topk_cpu.cpp): indices only, so a fake kernel and no autograd.

_topk_registered = False


def compute_topk(x, y, targets, self_cols, k: int, deterministic: bool) -> torch.Tensor:
    """[H, N, k] int64: the columns of each row's k largest S_ij, positive and self column excluded."""
    reason = _load_topk()
    if reason is not None:
        raise RuntimeError(f"the cpp backend cannot run: {reason}")
    br, bc = _block_sizes()
    return torch.ops.mmts_kernels.cpu_topk(x, y, targets, self_cols, k, deterministic, br, bc)


# A constant of the trace under torch.compile (as backends._choose): the build, the load and the fake kernel's
# registration run once, outside the graph.
@assume_constant_result  # without importing torch._dynamo at import time (compile_support)
def _load_topk() -> Optional[str]:
    global _topk_registered
    reason = unavailable_reason(torch.device("cpu"))
    if reason is None and not _topk_registered:
        _topk_registered = True
        torch.library.register_fake("mmts_kernels::cpu_topk")(_fake_topk)
    return reason


def _fake_topk(x, y, targets, self_cols, k, deterministic, block_rows, block_cols):
    return x.new_empty((x.shape[0], x.shape[1], k), dtype=torch.int64)
