"""Forward: every requested statistic of S = x yᵀ from one pass over its tiles, without locks (DESIGN §3).

One program per tile. The columns are cut into panels (usually one: see ``panel_width``); for each panel,

  1. ``tile_kernel``, grid (row blocks R, column blocks C of the panel, heads): computes its [BLOCK_N, BLOCK_M]
     tile of S with tl.dot over D, reduces it along the columns to a *row partial* and along the rows to a
     *column partial*, and stores both (O(BLOCK_N + BLOCK_M) numbers; the tile itself is never stored):

         row partial of row i over the tile's columns j        column partial of column j over the tile's rows i
         m = max_j z_ij,  l = Σ_j e^{z_ij − m},  w = Σ_j e^{..} S_ij   the same over i of z_ij = S_ij/τ_j
         hinge = Σ_{j≠t_i} relu(m_i + S_ij − pos_i),  cnt              over i ≠ j of m_j + S_ij − pos_j
         hard, arg = max over j ≠ t_i, lowest column                   max over i ≠ j, lowest row
         sig = Σ_j softplus(−z_ij u_ij),  u_ij = S_ij/τ_i + b_i        (rows only)
               z_ij = +1 on the positive (and on every same-label column under same_label "positive"), else −1

  2. ``merge_kernel`` (twice): folds the C row partials of each row into its running state (m, l, w, hinge, …,
     carried across panels), and the R column partials of each column into its final statistics — in a fixed
     order, so the result is bitwise reproducible with no extra cost: ``deterministic=True`` is free here.

     The log-sum-exp merge (m, l) ⊕ (m', l') = (max, l e^{m−max} + l' e^{m'−max}) is exact in any scale, so any
     input norm and τ down to 1e-3 stay finite (no fixed shift that assumes unit-norm rows).

NT-Xent (row direction only): with MASK_SELF, row i leaves out column self_i (the anchor itself) from every
statistic; with DECOUPLED, its positive from the log-sum-exp. An excluded logit is −inf, its e^{z − m} exactly 0;
a short last tile may hold only excluded columns of a row, whose partial is then (m = −inf, l = 0).
Labels (LABELS = 1, same_label "mask"): the tile compares lx of its rows with ly of its columns; row i also leaves
out every same-label column j ≠ t_i from every statistic, and in the square case column j every same-label row
i ≠ j (the same entries, as t_i = i). Whole tiles, even whole panels, of a row or column can then be excluded:
the merge takes MAY_BE_EMPTY and never computes −inf − (−inf). LABELS = 2 ("positive") changes only sig's z.
softplus(v) = max(v, 0) + log1p(e^{−|v|}) is finite for every finite v, in fp32 too (``_tiles.softplus_sigmoid``).
A row whose target is −1 (the sigmoid's ring blocks without its positive) matches no column: pos_i stays 0.

pos_i = S_{i,t_i} is stored by the one tile that holds column t_i — the very value its log-sum-exp saw — and that
tile's logit of the positive is pos_i/τ_i by IEEE division, bitwise what the loss subtracts, so every InfoNCE term
lse_i − pos_i/τ_i ≥ 0 in floating point too (the other logits are S·(1/τ), an ulp of |S|/τ apart: −6e-5 at
τ = 1e-3 when the positive's was too). The hinge needs pos before any tile, so with a hinge a small O(N·D) kernel
computes it first.

Work and traffic per panel of P columns (H heads, F ≤ 3 fields a direction):
    FLOPs   2·N·P·D in tl.dot (the whole forward: 2·N·M·D, a quarter of the 8·N·M·D of forward + backward),
            plus ≈ 2 exponentials per element of S (one a direction) in the epilogue; the sigmoid: one
            exponential, one logarithm and one division per element.
    bytes   x and y re-read once per tile column/row: (N·D·⌈P/BLOCK_M⌉ + P·D·⌈N/BLOCK_N⌉)·s, mostly from L2;
            partials written and read once: F·(N·P/BLOCK_M + P·N/BLOCK_N) fp32.
Extra memory: the partial buffers, capped by ``panel_width`` at about one fp32 copy of x and y.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import (dystress_tau, exact_positive, excluded_lse, hardest, logits, merge_hardest, relu_keep_nan,
                     row_exclusions, s_tile, softplus_sigmoid, tile_has_positive)


@triton.jit
def pos_kernel(X, Y, T, POS, N, D, sxh, sxn, sxd, syh, sym, syd, st,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """pos[h, i] = x[h, i] · y[h, t_i] — one row-wise dot per row, O(N·D)."""
    r = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    rows = r * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < N
    t = tl.load(T + rows * st, mask=row_ok, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_N,), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        ok = row_ok[:, None] & (d < D)[None, :]
        xv = tl.load(X + h * sxh + rows[:, None] * sxn + d[None, :] * sxd, mask=ok, other=0.0).to(ACC)
        yv = tl.load(Y + h * syh + t[:, None] * sym + d[None, :] * syd, mask=ok, other=0.0).to(ACC)
        acc += tl.sum(xv * yv, axis=1)
    tl.store(POS + h * N + rows, acc, mask=row_ok)


@triton.jit(do_not_specialize=["N", "M", "cb0", "C", "P", "st", "stau_h", "stau_n", "smar_h", "smar_n", "sb_h",
                               "sb_n"])
def tile_kernel(
    X, Y, T, TAU, MARGIN, POS, SELF, BIAS, LX, LY,
    R_MAX, R_SUM, R_WS, R_HINGE, R_CNT, R_HARD, R_ARG, R_SIG,   # row partials    [H, C, N]
    C_MAX, C_SUM, C_WS, C_HINGE, C_CNT, C_HARD, C_ARG,          # column partials [H, R, P]
    N, M, D, cb0, C, P, DYS,
    sxh, sxn, sxd, syh, sym, syd, st, stau_h, stau_n, smar_h, smar_n, sb_h, sb_n,
    LSE_ON: tl.constexpr, WS_ON: tl.constexpr, HINGE_ON: tl.constexpr, HARD_ON: tl.constexpr,
    COLS: tl.constexpr, DYSTRESS: tl.constexpr, POS_FROM_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr,
    MASK_SELF: tl.constexpr = False, DECOUPLED: tl.constexpr = False,
    SIG_ON: tl.constexpr = False, LABELS: tl.constexpr = 0,
):
    EXCL: tl.constexpr = MASK_SELF or LABELS == 1  # row i leaves out columns beyond t_i (is_self below)
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)  # column block within the panel
    h = tl.program_id(2).to(tl.int64)
    R = tl.num_programs(0).to(tl.int64)
    rows = r * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    local = c * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)  # column offset within the panel
    c_lo = (cb0 + c) * BLOCK_M  # first column of the tile
    cols = cb0 * BLOCK_M + local
    row_ok = rows < N
    col_ok = cols < M
    if COLS:
        t = rows  # square symmetric case: the positives are the diagonal
    else:
        t = tl.load(T + rows * st, mask=row_ok, other=0).to(tl.int64)

    S = s_tile(X, Y, h, rows, cols, N, M, D, sxh, sxn, sxd, syh, sym, syd,
               BLOCK_N, BLOCK_M, BLOCK_D, ACC, PRECISION, UPCAST)
    has_pos_tile = tile_has_positive(t, row_ok, r * BLOCK_N, c_lo, BLOCK_N, BLOCK_M, COLS)
    valid = row_ok[:, None] & col_ok[None, :]
    # index compares in int32 (N, M < 2³¹): an int64 [BLOCK_N, BLOCK_M] tile costs twice the registers
    rows32, cols32 = rows.to(tl.int32), cols.to(tl.int32)
    is_pos = cols32[None, :] == t.to(tl.int32)[:, None]
    neg = valid & ~is_pos  # the negatives of row i: j ≠ t_i
    is_self = is_pos  # a placeholder unless EXCL
    if MASK_SELF:  # …and j ≠ self_i
        is_self = cols32[None, :] == tl.load(SELF + rows, mask=row_ok, other=-1).to(tl.int32)[:, None]
    same, is_self = row_exclusions(is_pos, is_self, rows, cols, row_ok, col_ok, LX, LY, LABELS, MASK_SELF)
    if EXCL:  # …and every other excluded column
        neg = neg & ~is_self
    rp = (h * C + c) * N + rows  # this tile's slot in the row partials
    cp = (h * R + r) * P + local  # … and in the column partials
    if POS_FROM_TILE:
        if has_pos_tile:
            has_pos = row_ok & (t >= c_lo) & (t < c_lo + BLOCK_M)
            tl.store(POS + h * N + rows, tl.sum(tl.where(valid & is_pos, S, 0.0), axis=1), mask=has_pos)
    if HINGE_ON:
        pos_r = tl.load(POS + h * N + rows, mask=row_ok, other=0.0)
        mar_r = tl.load(MARGIN + h * smar_h + rows * smar_n, mask=row_ok, other=0.0).to(ACC)

    # ---- rows: reduce the tile along its columns
    if LSE_ON:
        if DYSTRESS:
            tau_ij = dystress_tau(S, tl.load(DYS), tl.load(DYS + 1))
            z = logits(S, tau_ij, FAST)
        else:
            tau_r = tl.load(TAU + h * stau_h + rows * stau_n, mask=row_ok, other=1.0).to(ACC)
            z = logits(S, tau_r[:, None], FAST)
            if has_pos_tile:
                z = exact_positive(z, S, valid & is_pos, tau_r, 1, FAST)
        z_row = tl.where(col_ok[None, :], z, float("-inf"))
        if EXCL or DECOUPLED:  # a tile may hold only excluded columns of a row: its partial is (−inf, 0)
            z_row = tl.where(excluded_lse(is_pos, is_self, EXCL, DECOUPLED), float("-inf"), z_row)
            p_max = tl.max(z_row, axis=1)
            e = tl.exp(z_row - tl.where(p_max == float("-inf"), 0.0, p_max)[:, None])  # not −inf − (−inf)
        else:
            p_max = tl.max(z_row, axis=1)
            e = tl.exp(z_row - p_max[:, None])
        tl.store(R_MAX + rp, p_max, mask=row_ok)
        tl.store(R_SUM + rp, tl.sum(e, axis=1), mask=row_ok)
        if WS_ON:
            tl.store(R_WS + rp, tl.sum(e * S, axis=1), mask=row_ok)
    if HINGE_ON:
        v = mar_r[:, None] + S - pos_r[:, None]
        tl.store(R_HINGE + rp, tl.sum(tl.where(neg, relu_keep_nan(v), 0.0), axis=1), mask=row_ok)
        tl.store(R_CNT + rp, tl.sum((neg & (v > 0)).to(tl.int32), axis=1), mask=row_ok)
    if HARD_ON:
        t_max, t_arg = hardest(S, neg, cols32[None, :], M, 1)
        tl.store(R_HARD + rp, t_max, mask=row_ok)
        tl.store(R_ARG + rp, t_arg.to(tl.int32), mask=row_ok)
    if SIG_ON:  # u = S/τ_i + b_i, z = +1 on positives: softplus(−z·u)
        tau_s = tl.load(TAU + h * stau_h + rows * stau_n, mask=row_ok, other=1.0).to(ACC)
        b_s = tl.load(BIAS + h * sb_h + rows * sb_n, mask=row_ok, other=0.0).to(ACC)
        u = logits(S, tau_s[:, None], FAST) + b_s[:, None]
        if LABELS == 2:
            positive = is_pos | same
        else:
            positive = is_pos
        sp, _ = softplus_sigmoid(tl.where(positive, -u, u))
        keep = valid
        if EXCL:
            keep = keep & ~is_self
        tl.store(R_SIG + rp, tl.sum(tl.where(keep, sp, 0.0), axis=1), mask=row_ok)

    # ---- columns (square symmetric case): reduce the tile along its rows
    if COLS:
        neg_c = valid & (rows32[:, None] != cols32[None, :])
        if LABELS == 1:  # column j leaves out the same-label rows i ≠ j (is_self: no self_cols with COLS)
            neg_c = neg_c & ~is_self
        if LSE_ON:
            if DYSTRESS:
                zc = z  # τ_ij is symmetric in the pair: the same logits
            else:
                tau_c = tl.load(TAU + h * stau_h + cols * stau_n, mask=col_ok, other=1.0).to(ACC)
                zc = logits(S, tau_c[None, :], FAST)
                if has_pos_tile:
                    zc = exact_positive(zc, S, valid & is_pos, tau_c, 0, FAST)
            zc = tl.where(row_ok[:, None], zc, float("-inf"))
            if LABELS == 1:
                zc = tl.where(is_self, float("-inf"), zc)
                q_max = tl.max(zc, axis=0)
                ec = tl.exp(zc - tl.where(q_max == float("-inf"), 0.0, q_max)[None, :])  # not −inf − (−inf)
            else:
                q_max = tl.max(zc, axis=0)
                ec = tl.exp(zc - q_max[None, :])
            tl.store(C_MAX + cp, q_max, mask=col_ok)
            tl.store(C_SUM + cp, tl.sum(ec, axis=0), mask=col_ok)
            if WS_ON:
                tl.store(C_WS + cp, tl.sum(ec * S, axis=0), mask=col_ok)
        if HINGE_ON:
            mar_c = tl.load(MARGIN + h * smar_h + cols * smar_n, mask=col_ok, other=0.0).to(ACC)
            pos_c = tl.load(POS + h * N + cols, mask=col_ok, other=0.0)
            vc = mar_c[None, :] + S - pos_c[None, :]
            tl.store(C_HINGE + cp, tl.sum(tl.where(neg_c, relu_keep_nan(vc), 0.0), axis=0), mask=col_ok)
            tl.store(C_CNT + cp, tl.sum((neg_c & (vc > 0)).to(tl.int32), axis=0), mask=col_ok)
        if HARD_ON:
            c_max, c_arg = hardest(S, neg_c, rows32[:, None], N, 0)
            tl.store(C_HARD + cp, c_max, mask=col_ok)
            tl.store(C_ARG + cp, c_arg.to(tl.int32), mask=col_ok)


@triton.jit(do_not_specialize=["K", "K_alloc", "L", "L_alloc", "off", "L_out", "finish", "sentinel"])
def merge_kernel(
    P_MAX, P_SUM, P_WS, P_HINGE, P_CNT, P_HARD, P_ARG, P_SIG,  # partials [H, K_alloc, L_alloc]
    S_MAX, S_SUM, S_WS, S_HINGE, S_CNT, S_HARD, S_ARG, S_SIG,  # state / result [H, L_out]
    K, K_alloc, L, L_alloc, off, L_out, finish, sentinel,
    LSE_ON: tl.constexpr, WS_ON: tl.constexpr, HINGE_ON: tl.constexpr, HARD_ON: tl.constexpr, BLOCK: tl.constexpr,
    SIG_ON: tl.constexpr = False, MAY_BE_EMPTY: tl.constexpr = False,
):
    """Fold K partials of each entry (the first K of K_alloc; entries off … off + L of the state), in order
    k = 0, 1, …, into its state; with ``finish``, turn the state into the statistics: S_MAX ← lse = m + log l,
    S_WS ← w / l. MAY_BE_EMPTY: with exclusions both the state and a partial can be empty (m = −inf), and the
    rescaling must then not compute −inf − (−inf)."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    loc = b * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = loc < L
    out = h * L_out + off + loc
    if LSE_ON:
        m = tl.load(S_MAX + out, mask=ok, other=float("-inf"))
        l_ = tl.load(S_SUM + out, mask=ok, other=0.0)
        if WS_ON:
            w = tl.load(S_WS + out, mask=ok, other=0.0)
    if HINGE_ON:
        hinge = tl.load(S_HINGE + out, mask=ok, other=0.0)
        cnt = tl.load(S_CNT + out, mask=ok, other=0)
    if HARD_ON:
        hard = tl.load(S_HARD + out, mask=ok, other=float("-inf"))
        arg = tl.load(S_ARG + out, mask=ok, other=sentinel)
    if SIG_ON:
        sig = tl.load(S_SIG + out, mask=ok, other=0.0)
    for k in range(0, K):
        src = (h * K_alloc + k) * L_alloc + loc
        if LSE_ON:
            p_max = tl.load(P_MAX + src, mask=ok, other=0.0)
            m_new = tl.maximum(m, p_max)
            if MAY_BE_EMPTY:
                shift = tl.where(m_new == float("-inf"), 0.0, m_new)
                a_old = tl.exp(m - shift)
                a_new = tl.exp(p_max - shift)
            else:
                a_old = tl.exp(m - m_new)  # 0 while the state is empty (m = −inf)
                a_new = tl.exp(p_max - m_new)
            l_ = l_ * a_old + tl.load(P_SUM + src, mask=ok, other=0.0) * a_new
            if WS_ON:
                w = w * a_old + tl.load(P_WS + src, mask=ok, other=0.0) * a_new
            m = m_new
        if HINGE_ON:
            hinge += tl.load(P_HINGE + src, mask=ok, other=0.0)
            cnt += tl.load(P_CNT + src, mask=ok, other=0).to(tl.int64)
        if HARD_ON:
            p_hard = tl.load(P_HARD + src, mask=ok, other=float("-inf"))
            p_arg = tl.load(P_ARG + src, mask=ok, other=sentinel).to(tl.int64)
            hard, arg = merge_hardest(p_hard, p_arg, hard, arg)
        if SIG_ON:
            sig += tl.load(P_SIG + src, mask=ok, other=0.0)
    if LSE_ON:
        if finish:
            tl.store(S_MAX + out, m + tl.log(l_), mask=ok)
            if WS_ON:
                tl.store(S_WS + out, w / l_, mask=ok)
        else:
            tl.store(S_MAX + out, m, mask=ok)
            tl.store(S_SUM + out, l_, mask=ok)
            if WS_ON:
                tl.store(S_WS + out, w, mask=ok)
    if HINGE_ON:
        tl.store(S_HINGE + out, hinge, mask=ok)
        tl.store(S_CNT + out, cnt, mask=ok)
    if HARD_ON:
        tl.store(S_HARD + out, hard, mask=ok)
        tl.store(S_ARG + out, arg, mask=ok)
    if SIG_ON:
        tl.store(S_SIG + out, sig, mask=ok)


def dot_upcast(x: torch.Tensor) -> bool:
    """The interpreter (CPU tensors) mishandles bf16: its tl.dot multiplies the raw bits and its fp32 → bf16 cast
    truncates. There bf16 tiles go to fp32 before tl.dot. Not on a GPU."""
    return x.dtype == torch.bfloat16 and x.device.type != "cuda"


def tf32_allowed() -> bool:
    """Whether PyTorch lets fp32 CUDA matmuls use TF32: matmul precision "high"/"medium" (legacy API), or
    fp32_precision = "tf32" (the per-backend API of torch ≥ 2.9; the legacy getter raises once it was used)."""
    try:
        return torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:
        value = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
        if value == "none":
            value = getattr(torch.backends, "fp32_precision", "none")
        return value == "tf32"


def dot_precision(x: torch.Tensor) -> str:
    """tl.dot's input_precision for fp32 inputs, from PyTorch's own switch (ignored for 16-bit inputs):
    "highest" (PyTorch's default) → "tf32x3", fp32-accurate (the 1e-5 bar) on tensor cores; "high"/"medium" →
    "tf32", as torch.matmul does then. fp64 and the interpreter: "ieee". Read at run time inside the forward and
    again inside the backward (a traced read would break torch.compile's graph): change the setting between a
    forward and its backward and the backward's S is not the forward's."""
    if x.dtype == torch.float64 or x.device.type != "cuda":
        return "ieee"
    return "tf32" if tf32_allowed() else "tf32x3"


def kernel_types(x: torch.Tensor):
    """(statistics dtype, its triton type, FAST) for the inputs' dtype; FAST (fp32): logits as S·(1/τ), the
    positive's by IEEE division (``_tiles.logits``, ``exact_positive``); fp64 divides exactly everywhere."""
    if x.dtype == torch.float64:
        return torch.float64, tl.float64, False
    return torch.float32, tl.float32, True


def dystress_params(x: torch.Tensor, cdt: torch.dtype, tau_min: float, tau_max: float) -> torch.Tensor:
    """(τ_min, ½(τ_max − τ_min)) as a device tensor in the statistics dtype. Not kernel float arguments: Triton
    passes a Python float as fp32, which rounds τ for fp64 inputs. Filled on the device: no host sync."""
    params = x.new_full((2,), float(tau_min), dtype=cdt)
    params[1:].fill_(0.5 * (float(tau_max) - float(tau_min)))
    return params


MAX_GRID_Y = 65535  # CUDA's limit on grid axis 1, where the column blocks of a panel go


def panel_width(N: int, M: int, D: int, per_column: int, block_m: int) -> int:
    """Columns per panel: as many column blocks as keep ``per_column``·P extra elements within (N + M)·max(D,
    BLOCK_M) — about one fp32 copy of x and y — and at least one block. Shared by the forward (partials) and
    the backward (the ∂L/∂S panel)."""
    budget = (N + M) * max(D, block_m)
    blocks = max(1, budget // max(1, per_column * block_m))
    return min(triton.cdiv(M, block_m), blocks, MAX_GRID_Y) * block_m


def launch_forward(x, y, tau, margin, targets, *, lse, hinge, hard, ws, cols, dystress, tau_min, tau_max,
                   deterministic, cfg, self_cols=None, decoupled=False, dys_grad=False, bias=None, labels_x=None,
                   labels_y=None, sigmoid=False, same_label=0):
    """Allocate the statistics (O(H·(N+M))) and the partials, run the panels, return the 14 tensors of ``Stats``
    in field order; fields not requested are empty tensors. ``same_label``: 0 none, 1 "mask", 2 "positive".
    ``deterministic`` needs nothing: every merge has a fixed order."""
    del deterministic, dys_grad  # the forward's values do not depend on where the gradient flows
    if cols and (self_cols is not None or decoupled or sigmoid):
        raise ValueError("triton backend: self_cols / decoupled / sigmoid are row statistics (cols=False)")
    if sigmoid and dystress:
        raise ValueError("triton backend: the sigmoid statistic takes per-row temperatures, not DySTreSS")
    H, N, D = x.shape
    M = y.shape[1]
    cdt, acc, fast = kernel_types(x)
    upcast, precision = dot_upcast(x), dot_precision(x)
    ws = lse and ws
    bn, bm = cfg.block_n, cfg.block_m
    R = triton.cdiv(N, bn)

    # a row whose target is −1 (sigmoid only: no positive in this y) keeps pos = 0, no tile stores it
    pos = x.new_zeros((H, N), dtype=cdt) if sigmoid else x.new_empty((H, N), dtype=cdt)
    if hinge:  # every tile's hinge needs pos first
        pos_kernel[(R, H)](x, y, targets, pos, N, D, *x.stride(), *y.stride(), targets.stride(0),
                           BLOCK_N=bn, BLOCK_D=cfg.block_d, ACC=acc, num_warps=4)

    def state(n, on, dtype=cdt, fill=None):
        if not on:  # a fresh empty tensor each: the outputs of a custom op must not alias each other
            return x.new_empty(0, dtype=dtype)
        return x.new_full((H, n), fill, dtype=dtype) if fill is not None else x.new_empty((H, n), dtype=dtype)

    i64, i32 = torch.int64, torch.int32
    # row state: lse ← running max m, plus running Σ, w; finished in the last merge
    r_state = [state(N, lse, fill=float("-inf")), state(N, lse, fill=0.0), state(N, ws, fill=0.0),
               state(N, hinge, fill=0.0), state(N, hinge, i64, 0), state(N, hard, fill=float("-inf")),
               state(N, hard, i64, M), state(N, sigmoid, fill=0.0)]
    c_state = [state(M, cols and lse, fill=float("-inf")), state(M, cols and lse, fill=0.0),
               state(M, cols and ws, fill=0.0), state(M, cols and hinge, fill=0.0),
               state(M, cols and hinge, i64, 0), state(M, cols and hard, fill=float("-inf")),
               state(M, cols and hard, i64, N)]

    per_dir = 2 * lse + ws + 2 * hinge + 2 * hard + sigmoid
    # partial entries a column of the panel costs; counted twice, so the partials stay within half the budget of
    # ``panel_width``: the forward's peak then stays below the backward's
    per_column = 2 * per_dir * (triton.cdiv(N, bm) + (R if cols else 0))
    P = cfg.panel_blocks * bm or panel_width(N, M, D, per_column, bm)
    C = P // bm

    def partials(K, L, on_cols):
        def buf(on, dtype=cdt):
            on = on and (cols or not on_cols)
            return x.new_empty((H, K, L) if on else (0,), dtype=dtype)
        return [buf(lse), buf(lse), buf(ws), buf(hinge), buf(hinge, i32), buf(hard), buf(hard, i32)]

    r_part = partials(C, N, False) + [x.new_empty((H, C, N) if sigmoid else (0,), dtype=cdt)]
    c_part = partials(R, P, True)
    dys = dystress_params(x, cdt, tau_min, tau_max) if dystress else pos
    tau_arg = tau if tau is not None else pos  # unused pointer arguments get any valid tensor
    mar_arg = margin if margin is not None else pos
    bias_arg = bias if bias is not None else pos
    stau = tau.stride() if tau is not None else (0, 0)
    smar = margin.stride() if margin is not None else (0, 0)
    sbias = bias.stride() if bias is not None else (0, 0)
    labels = (labels_x.contiguous(), labels_y.contiguous()) if same_label else (targets, targets)
    flags = dict(LSE_ON=lse, WS_ON=ws, HINGE_ON=hinge, HARD_ON=hard)
    merge = dict(BLOCK=cfg.merge_block, num_warps=4)
    # exclusions can leave a whole tile, even a whole panel, of a row or column without an lse term
    may_be_empty = same_label == 1 or self_cols is not None or decoupled
    num_c = triton.cdiv(M, bm)
    for cb0 in range(0, num_c, C):
        c_here = min(C, num_c - cb0)
        tile_kernel[(R, c_here, H)](
            x, y, targets, tau_arg, mar_arg, pos, self_cols.contiguous() if self_cols is not None else targets,
            bias_arg, *labels, *r_part, *c_part,
            N, M, D, cb0, C, P, dys,
            *x.stride(), *y.stride(), targets.stride(0), *stau, *smar, *sbias,
            **flags, COLS=cols, DYSTRESS=dystress, POS_FROM_TILE=not hinge,
            BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=cfg.block_d, ACC=acc, PRECISION=precision, UPCAST=upcast, FAST=fast,
            MASK_SELF=self_cols is not None, DECOUPLED=decoupled and lse, SIG_ON=sigmoid, LABELS=same_label,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False)
        last = cb0 + C >= num_c
        merge_kernel[(triton.cdiv(N, cfg.merge_block), H)](
            *r_part, *r_state, c_here, C, N, N, 0, N, int(last), M, **flags, **merge,
            SIG_ON=sigmoid, MAY_BE_EMPTY=may_be_empty)
        if cols:
            width = min(P, M - cb0 * bm)
            merge_kernel[(triton.cdiv(width, cfg.merge_block), H)](
                *c_part, c_part[0], *c_state, c_state[0], R, R, width, P, cb0 * bm, M, 1, N, **flags, **merge,
                SIG_ON=False, MAY_BE_EMPTY=may_be_empty)
    lse_t, _, ws_t, hinge_t, cnt_t, hard_t, arg_t, sig_t = r_state
    lse_c, _, ws_c, hinge_c, cnt_c, hard_c, arg_c = c_state
    return (pos, lse_t, hinge_t, cnt_t, hard_t, arg_t, ws_t, lse_c, hinge_c, cnt_c, hard_c, arg_c, ws_c, sig_t)
