"""The ``cpp`` backend: the statistics of ``mmts_kernels.stats`` from a fused, tiled, multi-threaded C++ kernel.

csrc/mmts_cpu.cpp streams S = x yᵀ in BR×BC tiles (one BLAS call per tile into a per-thread buffer), reduces each
tile in place to the running row (and column) statistics, and never holds anything O(N·M); the backward
recomputes the tiles and accumulates dx = dS·y and dy = dSᵀ·x per tile with BLAS. It is registered as the
operators ``torch.ops.mmts_kernels.cpu_stats`` / ``cpu_stats_backward``; this module adds their fake (meta)
kernels and the autograd formula, so the op is differentiable w.r.t. x, y, tau, margin and bias and visible to
torch.compile:

    ∂/∂x, ∂/∂y    from cpu_stats_backward (tiles recomputed; the pos and −cnt·g^hinge terms join dS at (i, t_i),
                  the hardest-negative terms are gathered outside the tiles). When y is x (NT-Xent's Z against
                  itself) the op gets y=None and its backward returns all of dZ as dx and no dy: one N×D gradient.
                  The sigmoid alone (x or y requiring grad, grad mode on): the forward also computes Q·y and Qᵀ·x,
                  Q_ij = ∂sig_i/∂S_ij, from its tiles (``sig_q``); the backward writes dx, dy into those buffers,
                  scaling them by g^sig when g^sig is uniform over the rows of a head (the mean and the sum: no
                  tile, no GEMM, no new N×D buffer), recomputing the tiles otherwise
    ∂/∂tau_i      −g^lse_i · ws_i/τ_i² − g^lse_c_i · ws^c_i/τ_i² + g^sig_i · Σ_j z_ij σ(v_ij) S_ij/τ_i²
                  (ws and the sigmoid's two sums are computed in the forward when τ or the bias requires grad)
    ∂/∂bias_i     −g^sig_i · Σ_j z_ij σ(v_ij),   v_ij = −z_ij (S_ij/τ_i + b_i)
    self_cols, decoupled (row direction), same_label="mask" (rows and columns): excluded entries get no
                  probability mass, no hinge, no hardest negative, no softplus, and dS = 0; DySTreSS with
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

# The op's outputs: the Stats fields, then the sigmoid's Σ_j z σ(v) and Σ_j z σ(v) S_ij (for ∂sig/∂bias, ∂sig/∂τ),
# and its fused gradient products qx = Q·y, qy = Qᵀ·x, Q_ij = ∂sig_i/∂S_ij ([H, N, D], [H, M, D] or empty: sig_q).
FIELDS = ("pos", "lse", "hinge", "cnt", "hard", "arg", "ws", "lse_c", "hinge_c", "cnt_c", "hard_c", "arg_c", "ws_c",
          "sig", "sig_b", "sig_t", "qx", "qy")
_INT_FIELDS = ("cnt", "arg", "cnt_c", "arg_c")
SAME_LABEL = {None: 0, "mask": 1, "positive": 2}  # request.same_label as the op's int


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


def compute_stats(x, y, tau, margin, targets, request: StatsRequest, self_cols=None, *, bias=None,
                  labels=None) -> Stats:
    reason = unavailable_reason(x.device)
    if reason is not None:
        raise RuntimeError(f"the cpp backend cannot run: {reason}")
    d = request.dystress
    use_tau = (request.lse and d is None) or request.sigmoid
    lx, ly = labels if request.same_label else (None, None)
    # The sigmoid's Σ z σ and Σ z σ S only when the bias or τ will want a gradient (as ws for the lse).
    sig_grad = request.sigmoid and any(t is not None and t.requires_grad for t in (tau, bias))
    br, bc = _block_sizes()
    # The sigmoid alone with x or y to differentiate: the forward also computes Q·y and Qᵀ·x, which the backward
    # only scales when the upstream gradient is uniform over the rows (the usual mean or sum): one GEMM per tile
    # pair fewer than recomputing S there. Bit 1: x (when y is x, all of dZ), bit 2: y.
    sig_q = 0
    if request.sigmoid and not (request.lse or request.hinge or request.hard) and torch.is_grad_enabled():
        sig_q = (1 if x.requires_grad else 0) | (2 if y is not x and y.requires_grad else 0)
    out = torch.ops.mmts_kernels.cpu_stats(
        x, None if y is x else y, tau if use_tau else None, margin if request.hinge else None, targets,
        request.lse, request.hinge, request.hard, request.ws and request.lse and d is None, request.cols,
        d is not None, float(d.tau_min) if d is not None else 0.0, float(d.tau_max) if d is not None else 0.0,
        request.deterministic, br, bc, self_cols, request.decoupled, d is not None and not d.detach,
        bias if request.sigmoid else None, lx, ly, request.sigmoid, SAME_LABEL[request.same_label], sig_grad,
        sig_q,
    )
    fields = {name: (t if t.numel() > 0 or name == "pos" else None) for name, t in zip(FIELDS, out)}
    return Stats(**{name: fields[name] for name in Stats._fields})


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
                deterministic, block_rows, block_cols, self_cols=None, decoupled=False, dys_grad=False, bias=None,
                labels_x=None, labels_y=None, sigmoid=False, same_label=0, sig_grad=False, sig_q=0):
    H, N = x.shape[0], x.shape[1]
    cdt = compute_dtype(x.dtype)
    on = dict(pos=True, lse=lse, hinge=hinge, cnt=hinge, hard=hard, arg=hard, ws=ws and lse and not dystress)
    for name in ("lse", "hinge", "cnt", "hard", "arg", "ws"):
        on[name + "_c"] = on[name] and cols
    on.update(sig=sigmoid, sig_b=sigmoid and sig_grad, sig_t=sigmoid and sig_grad)
    rows = tuple(
        x.new_empty((H, N) if on[name] else (0,), dtype=torch.int64 if name in _INT_FIELDS else cdt)
        for name in FIELDS[:-2]
    )
    qx = x.new_empty(x.shape if sig_q & 1 else (0,), dtype=cdt)
    qy = x.new_empty(y.shape if sig_q & 2 and y is not None else (0,), dtype=cdt)
    return rows + (qx, qy)


def _fake_backward(x, y, tau, margin, targets, *rest):
    return torch.empty_like(x), (x.new_empty((0,)) if y is None else torch.empty_like(y))


# The schema's trailing defaults: self_cols, decoupled, dys_grad, bias, labels_x, labels_y, sigmoid, same_label,
# sig_grad, sig_q.
_OP_DEFAULTS = (None, False, False, None, None, None, False, 0, False, 0)
_BIAS = 19  # the position of bias among the op's inputs


def _setup_context(ctx, inputs, output):
    ctx.num_inputs = len(inputs)  # backward returns one gradient per input the op was called with
    inputs = tuple(inputs) + _OP_DEFAULTS[len(inputs) - 16:]
    (x, y, tau, margin, targets, lse, hinge, hard, ws, cols, dystress, tau_min, tau_max, deterministic,
     block_rows, block_cols, self_cols, decoupled, dys_grad, bias, labels_x, labels_y, sigmoid, same_label,
     sig_grad, sig_q) = inputs
    out = dict(zip(FIELDS, output))
    ctx.flags = (cols, dystress, tau_min, tau_max, deterministic, block_rows, block_cols)
    ctx.row_flags = (decoupled, dys_grad)
    ctx.same_label = same_label
    ctx.has_tau, ctx.has_margin, ctx.has_bias = tau is not None, margin is not None, bias is not None
    ctx.save_for_backward(x, y, tau, margin, targets, out["pos"], out["lse"], out["lse_c"], out["cnt"],
                          out["cnt_c"], out["arg"], out["arg_c"], out["ws"], out["ws_c"], self_cols, bias, labels_x,
                          labels_y, out["sig_b"], out["sig_t"])
    # The fused products become the gradients in place (cpu_stats_backward writes into them), so they are kept as
    # attributes, not saved tensors (whose version check would refuse them after), and handed out once: a second
    # backward through a retained graph recomputes the tiles. Detached: no reference cycle through the outputs.
    q = (out["qx"], out["qy"])
    ctx.mark_non_differentiable(*q)
    ctx.set_materialize_grads(False)  # no N×D zeros for the unused gradients of qx and qy: None instead
    ctx.sig_q = tuple(t.detach() if t.numel() > 0 else None for t in q) if any(t.numel() > 0 for t in q) else None


def _present(g) -> bool:
    return g is not None and g.numel() > 0


def _backward(ctx, *grads):
    (x, y, tau, margin, targets, pos, lse, lse_c, cnt, cnt_c, arg, arg_c, ws, ws_c, self_cols, bias, labels_x,
     labels_y, sig_b, sig_t) = ctx.saved_tensors
    g = dict(zip(FIELDS, grads))
    cols, dystress, tau_min, tau_max, deterministic, block_rows, block_cols = ctx.flags

    def opt(name):
        return g[name] if _present(g[name]) else None

    dx = dy = dtau = dmargin = None
    qx, qy = ctx.sig_q or (None, None)
    ctx.sig_q = None  # spent (or not needed): freed with this backward
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:  # y None (y is x): dx is all of dZ, no dy
        dx, dy = torch.ops.mmts_kernels.cpu_stats_backward(
            x, y, tau, margin, targets, pos, lse, lse_c, cnt, cnt_c, arg, arg_c,
            opt("pos"), opt("lse"), opt("hinge"), opt("hard"), opt("lse_c"), opt("hinge_c"), opt("hard_c"),
            cols, dystress, tau_min, tau_max, deterministic, block_rows, block_cols, self_cols, *ctx.row_flags,
            opt("sig"), bias, labels_x, labels_y, ctx.same_label, qx, qy)
        if qx is not None:  # the gradients went into the fused products
            dx = qx.to(x.dtype)
        if qy is not None:
            dy = qy.to(y.dtype)
    if ctx.has_tau and ctx.needs_input_grad[2]:
        # ∂lse_i/∂τ_i = −ws_i/τ_i² (column j alike with τ_j); ∂sig_i/∂τ_i = Σ_j z σ(v) S_ij / τ_i² = sig_t_i/τ_i²
        t = tau.to(pos.dtype)
        acc = torch.zeros(torch.broadcast_shapes(t.shape, pos.shape), dtype=pos.dtype)
        if opt("lse") is not None:
            acc = acc - g["lse"] * ws
        if opt("lse_c") is not None:
            acc = acc - g["lse_c"] * ws_c
        if opt("sig") is not None:
            acc = acc + g["sig"] * _sig_sums(sig_t)
        dtau = (acc / (t * t)).to(tau.dtype)
    if ctx.has_margin and ctx.needs_input_grad[3]:  # ∂hinge_i/∂m_i = cnt_i
        acc = torch.zeros(margin.shape, dtype=pos.dtype)
        if opt("hinge") is not None:
            acc = acc + g["hinge"] * cnt.to(pos.dtype)
        if opt("hinge_c") is not None:
            acc = acc + g["hinge_c"] * cnt_c.to(pos.dtype)
        dmargin = acc.to(margin.dtype)
    gradients = [dx, dy if y is not None else None, dtau, dmargin] + [None] * (ctx.num_inputs - 4)
    if ctx.has_bias and ctx.needs_input_grad[_BIAS] and opt("sig") is not None:  # ∂sig_i/∂b_i = −Σ_j z σ(v)
        gradients[_BIAS] = (-g["sig"] * _sig_sums(sig_b)).to(bias.dtype)
    return tuple(gradients)


def _sig_sums(t: torch.Tensor) -> torch.Tensor:
    if t.numel() == 0:
        raise RuntimeError("mmts_kernels cpp: the gradient of tau or bias through sig needs the op called with "
                           "sig_grad=True (compute_stats sets it when tau or bias requires grad)")
    return t


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
