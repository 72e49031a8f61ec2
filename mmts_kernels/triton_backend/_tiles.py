"""Triton building blocks shared by the forward and the backward kernels.

    S tile:    S[rows, cols] = x[h, rows, :] · y[h, cols, :]ᵀ for one [BLOCK_N, BLOCK_M] tile, accumulated over D in
               BLOCK_D steps with tl.dot (fp32 accumulation; fp64 for fp64 inputs). The D loop is the only loop
               of a program, so Triton software-pipelines its loads (num_stages) as in a plain GEMM.
    logits:    z_ij = S_ij/τ_ij, built the same way in the forward and the backward (``logits``), with the
               positive's as the loss computes it (``exact_positive``).
    DySTreSS:  τ(s) = τ_min + ½(τ_max − τ_min)(1 + cos(π(1 + s)))  on the (detached) similarity s; with the
               gradient through τ (detach=False) the slope of s/τ(s) is (τ − s·τ'(s))/τ² (``dystress_slope``).
    excluded:  NT-Xent's per-row excluded column (the anchor itself) and the decoupled positive (``excluded_lse``).
    sigmoid:   softplus(v) = max(v, 0) + log1p(e^{−|v|}) and σ(v) from the same e^{−|v|} (``softplus_sigmoid``).
    labels:    same_ij = (lx_i == ly_j) on a tile (``label_match``) and the entries "mask" leaves out
               (``row_exclusions``).

Every index is int64 before it meets a stride, so offsets past 2³¹ elements are exact.
"""
from __future__ import annotations

import triton
import triton.language as tl

PI = tl.constexpr(3.141592653589793)  # globals used inside @triton.jit must be constexpr


@triton.jit
def s_tile(X, Y, h, rows, cols, N, M, D, sxh, sxn, sxd, syh, sym, syd,
           BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
           ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """S[rows, cols] for one head, [BLOCK_N, BLOCK_M] in ACC. Both operands are loaded feature-contiguous
    ([rows, d] and [cols, d]) and y's is transposed in registers, the layout tensor cores want for bf16/fp16.
    PRECISION: "ieee" (fp64), "tf32x3" (fp32 under matmul precision "highest": three TF32 products, fp32-accurate)
    or "tf32" ("high"/"medium"); ignored for bf16/fp16. UPCAST (interpreter only): its tl.dot mishandles bf16,
    so operands go to fp32 first (products of bf16 values are exact in fp32)."""
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=ACC)
    row_ok = rows < N
    col_ok = cols < M
    x_base = X + h * sxh + rows[:, None] * sxn
    y_base = Y + h * syh + cols[:, None] * sym
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        d_ok = d < D
        xt = tl.load(x_base + d[None, :] * sxd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        yt = tl.load(y_base + d[None, :] * syd, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            yt = yt.to(tl.float32)
        acc = tl.dot(xt, tl.trans(yt), acc, input_precision=PRECISION, out_dtype=ACC)
    return acc


@triton.jit
def dystress_tau(s, tau_min, tau_half_range):
    """Per-pair temperature of DySTreSS; ``tau_half_range`` = ½(τ_max − τ_min), both loaded in s's dtype."""
    return tau_min + tau_half_range * (1.0 + tl.cos((1.0 + s) * PI))  # tensor first: constexpr * tensor is a
    # constexpr under the interpreter of triton ≥ 3.7, which tl.cos then rejects


@triton.jit
def dystress_slope(s, tau, tau_half_range):
    """∂(s/τ(s))/∂s = (τ − s·τ'(s))/τ², τ'(s) = −½(τ_max − τ_min)·π·sin(π(1 + s)); ``tau`` = τ(s)."""
    return (tau + s * tau_half_range * PI * tl.sin((1.0 + s) * PI)) / (tau * tau)


@triton.jit
def excluded_lse(is_pos, is_self, MASK_SELF: tl.constexpr, DECOUPLED: tl.constexpr):
    """Entries left out of row i's log-sum-exp: its own column (MASK_SELF), and its positive when DECOUPLED (DCL).
    Only called when one of the two is on."""
    if MASK_SELF:
        if DECOUPLED:
            return is_self | is_pos
        else:
            return is_self
    else:
        return is_pos


@triton.jit
def logits(S, tau, FAST: tl.constexpr):
    """z = S/τ: fp32 as S·(1/τ) (one multiply an element; the reciprocal is per row or column unless τ is per
    pair); fp64 with an exact division. Forward and backward build z the same way, bit for bit, so the backward's
    p = e^{z − lse} sees the very z the forward's lse was made of (a different rounding would shift p by ulp(z),
    10⁻³ relative at |z| = 10⁴)."""
    if FAST:  # the kernels are compiled without FMA contraction, so z is this rounded product in both passes
        return S * (1.0 / tau)
    else:
        return S / tau


@triton.jit
def tile_has_positive(t, row_ok, r_lo, c_lo, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, DIAGONAL: tl.constexpr):
    """Whether the tile of rows r_lo… and columns c_lo… holds a positive (i, t_i): a scalar, so the positive's
    extra work runs on those tiles only. DIAGONAL: t_i = i (square symmetric case), decided from the ranges."""
    if DIAGONAL:
        return (c_lo < r_lo + BLOCK_N) & (r_lo < c_lo + BLOCK_M)
    else:
        return tl.max((row_ok & (t >= c_lo) & (t < c_lo + BLOCK_M)).to(tl.int32), axis=0) > 0


@triton.jit
def exact_positive(z, S, sel, tau, AXIS: tl.constexpr, FAST: tl.constexpr):
    """z with its positive entries (``sel``, at most one per row for AXIS = 1, per column for AXIS = 0) replaced
    by the IEEE quotient S/τ — bitwise the loss's pos/τ, so lse − pos/τ ≥ 0 holds in floating point too: lse ≥ max z
    ≥ pos/τ. ``tau``: the [rows] (AXIS = 1) or [columns] (AXIS = 0) temperatures. Only fp32 needs it."""
    if FAST:
        p = tl.sum(tl.where(sel, S, 0.0), axis=AXIS)
        q = tl.math.div_rn(p, tau)
        return tl.where(sel, tl.expand_dims(q, AXIS), z)
    else:
        return z


@triton.jit
def relu_keep_nan(v):
    """relu(v) that lets NaN through (torch.relu does; a bare where(v > 0, v, 0) would turn NaN into 0)."""
    return tl.where((v > 0) | (v != v), v, 0.0)


@triton.jit
def hardest(S, neg, idx, sentinel, AXIS: tl.constexpr):
    """Max of S over the negatives ``neg`` along AXIS and its lowest index (``idx`` broadcasts along AXIS;
    ``sentinel`` when there is none). A NaN negative is the max, as in torch.amax: NaN propagates."""
    finite = neg & (S == S)
    vals = tl.where(finite, S, float("-inf"))
    best = tl.max(vals, axis=AXIS)
    arg = tl.min(tl.where(finite & (vals == tl.expand_dims(best, AXIS)), idx, sentinel), axis=AXIS)
    nan_arg = tl.min(tl.where(neg & (S != S), idx, sentinel), axis=AXIS)
    has_nan = nan_arg < sentinel
    return tl.where(has_nan, float("nan"), best), tl.where(has_nan, nan_arg, arg)


@triton.jit
def merge_hardest(new, new_arg, old, old_arg):
    """Merge two (max, lowest index) partials in any order: larger wins, ties go to the lower index, NaN wins."""
    new_nan = new != new
    old_ok = old == old
    take = (new_nan & (old_ok | (new_arg < old_arg))) | (old_ok & ((new > old) | ((new == old) & (new_arg < old_arg))))
    return tl.where(take, new, old), tl.where(take, new_arg, old_arg)


@triton.jit
def softplus_sigmoid(v):
    """(softplus(v), σ(v)) for every finite v, from one e = exp(−|v|) ∈ (0, 1]:

        softplus(v) = max(v, 0) + log1p(e),    σ(v) = 1/(1 + e) for v ≥ 0, e/(1 + e) below.

    log1p without a log1p (the interpreter has no libdevice): log1p(e) = log(w)·e/(w − 1) with w = 1 + e rounded,
    exact to a few ulps because w − 1 is exact and the quotient cancels w's rounding (Goldberg); log1p(e) = e
    where w rounds to 1. A plain log(1 + e) loses all digits of e below ulp(1): the terms of the negatives at
    bias −10 are e^{−10} ≈ 4.5e-5, 10⁻³ relative in fp32. tl.log is the accurate libdevice log on a GPU too."""
    e = tl.exp(-tl.abs(v))
    w = 1.0 + e
    gap = w - 1.0
    log1p_e = tl.where(gap == 0.0, e, tl.log(w) * (e / tl.where(gap == 0.0, 1.0, gap)))
    return tl.maximum(v, 0.0) + log1p_e, tl.where(v >= 0, 1.0, e) / w


@triton.jit
def label_match(LX, LY, rows, cols, row_ok, col_ok):
    """same_ij = (lx_i == ly_j) on one tile, compared as loaded (int64): no narrowing can merge two classes."""
    lx = tl.load(LX + rows, mask=row_ok, other=0)
    ly = tl.load(LY + cols, mask=col_ok, other=0)
    return lx[:, None] == ly[None, :]


@triton.jit
def row_exclusions(is_pos, is_self, rows, cols, row_ok, col_ok, LX, LY, LABELS: tl.constexpr,
                   MASK_SELF: tl.constexpr):
    """(same-label matrix, excluded entries of each row) of one tile under the label switch LABELS (0: none, 1:
    "mask", 2: "positive"). "mask": the same-label columns other than the target leave every statistic, as the
    self column does (MASK_SELF); in the square case the same matrix, transposed, is what each column leaves out
    (the target there is the diagonal). Without labels the first output is a placeholder; without exclusions the
    second is."""
    same = is_pos
    if LABELS != 0:
        same = label_match(LX, LY, rows, cols, row_ok, col_ok)
    excluded = is_self
    if LABELS == 1:
        if MASK_SELF:
            excluded = is_self | (same & ~is_pos)
        else:
            excluded = same & ~is_pos
    return same, excluded
