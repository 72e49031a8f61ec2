"""Backward: recompute the tiles of S, form ∂L/∂S tile by tile, accumulate dx = dS·y and dy = dSᵀ·x (DESIGN §3).

With the upstream gradients g of the statistics (row i, column j of the symmetric case; zero where not requested):

    dS_ij =  g^lse_i · p_ij / τ_ij                 p_ij  = exp(S_ij/τ_ij − lse_i)      (τ_ij detached: DySTreSS)
           + g^hinge_i · 1[j ≠ t_i, m_i + S_ij − pos_i > 0]
           + c_i · 1[j = t_i]                      c_i   = g^pos_i − cnt_i g^hinge_i − cnt^c_i g^hinge,c_i
           + g^hard_i · 1[j = arg_i]
           + g^lse,c_j · p^c_ij / τ_j              p^c_ij = exp(S_ij/τ_j − lse^c_j)
           + g^hinge,c_j · 1[i ≠ j, m_j + S_ij − pos_j > 0]
           + g^hard,c_j · 1[i = arg^c_j]

(the −cnt g^hinge terms are ∂hinge/∂pos; in the symmetric case the column positive S_jj is pos_j, so both
directions fold into the one coefficient c on S_{i,t_i}). Temperatures and margins get O(N) closed forms on the
host: ∂lse_i/∂τ_i = −ws_i/τ_i², ∂hinge_i/∂m_i = cnt_i.

Where the one-element terms go. The positive, hardest-negative and −cnt·g^hinge terms touch one element of S per
row (or column). They are added to the dS tile as where(j == t_i, c_i, 0) rather than applied afterwards with
gather / index_add: the scatter into dy (dy_{t_i} += c_i x_i with repeated targets, dx_{arg^c_j} += … with
repeated argmaxes) would need atomics, which are not bitwise reproducible, or a sort; inside the tile it costs one
compare and select per element next to an exp, needs no O(N·D) temporaries, and is deterministic. The kernels
themselves use no atomics: each program owns its output rows (dx) or columns (dy).

Grids: dx (row blocks, D chunks, heads) sweeps column tiles; dy (column blocks, D chunks, heads) sweeps row tiles.
Each program recomputes S over the full D and accumulates only its BLOCK_DO slice of the output, so the
accumulator stays small for any D (the S tile is recomputed once per output slice).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import dystress_tau, s_tile
from .forward import dot_upcast


@triton.jit
def ds_tile(S, h, rows, cols, row_ok, col_ok, N, M,
            T, st, TAU, stau_h, stau_n, MARGIN, smar_h, smar_n, POS,
            LSE, G_LSE, G_HINGE, C_POS, G_HARD, ARG,
            LSE_C, G_LSE_C, G_HINGE_C, G_HARD_C, ARG_C,
            tau_min, tau_half_range,
            LSE_ON: tl.constexpr, HINGE_ON: tl.constexpr, HARD_ON: tl.constexpr, COLS: tl.constexpr,
            DYSTRESS: tl.constexpr, ACC: tl.constexpr):
    """∂L/∂S on one tile (the formula in the module docstring), zero outside the matrix."""
    rv = h * N + rows  # row vectors are [H, N] contiguous, column vectors [H, M]
    cv = h * M + cols
    if COLS:
        t = rows
    else:
        t = tl.load(T + rows * st, mask=row_ok, other=0).to(tl.int64)
    is_pos = cols[None, :] == t[:, None]
    c_pos = tl.load(C_POS + rv, mask=row_ok, other=0.0)
    ds = tl.where(is_pos, c_pos[:, None], 0.0).to(ACC)
    if LSE_ON:
        if DYSTRESS:
            tau_r = dystress_tau(S, tau_min, tau_half_range)
        else:
            tau_r = tl.load(TAU + h * stau_h + rows * stau_n, mask=row_ok, other=1.0).to(ACC)[:, None]
        lse_r = tl.load(LSE + rv, mask=row_ok, other=0.0)
        g_r = tl.load(G_LSE + rv, mask=row_ok, other=0.0)
        ds += g_r[:, None] * tl.exp(S / tau_r - lse_r[:, None]) / tau_r
        if COLS:  # τ_j of column j: a per-sample τ has N = M entries only in this square case
            if DYSTRESS:
                tau_c = tau_r
            else:
                tau_c = tl.load(TAU + h * stau_h + cols * stau_n, mask=col_ok, other=1.0).to(ACC)[None, :]
            lse_c = tl.load(LSE_C + cv, mask=col_ok, other=0.0)
            g_c = tl.load(G_LSE_C + cv, mask=col_ok, other=0.0)
            ds += g_c[None, :] * tl.exp(S / tau_c - lse_c[None, :]) / tau_c
    if HINGE_ON:
        mar_r = tl.load(MARGIN + h * smar_h + rows * smar_n, mask=row_ok, other=0.0).to(ACC)
        pos_r = tl.load(POS + rv, mask=row_ok, other=0.0)
        gh_r = tl.load(G_HINGE + rv, mask=row_ok, other=0.0)
        v = mar_r[:, None] + S - pos_r[:, None]
        ds += tl.where(~is_pos & (v > 0), gh_r[:, None], 0.0)
        if COLS:
            mar_c = tl.load(MARGIN + h * smar_h + cols * smar_n, mask=col_ok, other=0.0).to(ACC)
            pos_c = tl.load(POS + h * N + cols, mask=col_ok, other=0.0)
            gh_c = tl.load(G_HINGE_C + cv, mask=col_ok, other=0.0)
            vc = mar_c[None, :] + S - pos_c[None, :]
            ds += tl.where((rows[:, None] != cols[None, :]) & (vc > 0), gh_c[None, :], 0.0)
    if HARD_ON:
        a_r = tl.load(ARG + rv, mask=row_ok, other=-1)
        gd_r = tl.load(G_HARD + rv, mask=row_ok, other=0.0)
        ds += tl.where(cols[None, :] == a_r[:, None], gd_r[:, None], 0.0)
        if COLS:
            a_c = tl.load(ARG_C + cv, mask=col_ok, other=-1)
            gd_c = tl.load(G_HARD_C + cv, mask=col_ok, other=0.0)
            ds += tl.where(rows[:, None] == a_c[None, :], gd_c[None, :], 0.0)
    return tl.where(row_ok[:, None] & col_ok[None, :], ds, 0.0)


@triton.jit
def grad_kernel(
    X, Y, OUT,
    T, TAU, MARGIN, POS, LSE, G_LSE, G_HINGE, C_POS, G_HARD, ARG, LSE_C, G_LSE_C, G_HINGE_C, G_HARD_C, ARG_C,
    N, M, D, tau_min, tau_half_range,
    sxh, sxn, sxd, syh, sym, syd, st, stau_h, stau_n, smar_h, smar_n,
    FOR_Y: tl.constexpr,  # False: dx = dS·y (a program owns rows); True: dy = dSᵀ·x (a program owns columns)
    LSE_ON: tl.constexpr, HINGE_ON: tl.constexpr, HARD_ON: tl.constexpr, COLS: tl.constexpr,
    DYSTRESS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    ACC: tl.constexpr, S_PRECISION: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    dc = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    do = dc * BLOCK_DO + tl.arange(0, BLOCK_DO).to(tl.int64)
    do_ok = do < D
    if FOR_Y:
        cols = b * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        col_ok = cols < M
        acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=ACC)
        num_tiles = tl.cdiv(N, BLOCK_N)
    else:
        rows = b * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = rows < N
        acc = tl.zeros((BLOCK_N, BLOCK_DO), dtype=ACC)
        num_tiles = tl.cdiv(M, BLOCK_M)
    for k in range(0, num_tiles):
        if FOR_Y:
            rows = k * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
            row_ok = rows < N
        else:
            cols = k * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
            col_ok = cols < M
        S = s_tile(X, Y, h, rows, cols, N, M, D, sxh, sxn, sxd, syh, sym, syd,
                   BLOCK_N, BLOCK_M, BLOCK_D, ACC, S_PRECISION, UPCAST)
        ds = ds_tile(S, h, rows, cols, row_ok, col_ok, N, M,
                     T, st, TAU, stau_h, stau_n, MARGIN, smar_h, smar_n, POS,
                     LSE, G_LSE, G_HINGE, C_POS, G_HARD, ARG,
                     LSE_C, G_LSE_C, G_HINGE_C, G_HARD_C, ARG_C,
                     tau_min, tau_half_range,
                     LSE_ON, HINGE_ON, HARD_ON, COLS, DYSTRESS, ACC)
        if FOR_Y:
            xv = tl.load(X + h * sxh + rows[:, None] * sxn + do[None, :] * sxd,
                         mask=row_ok[:, None] & do_ok[None, :], other=0.0)
            acc = tl.dot(tl.trans(ds), xv.to(ACC), acc, input_precision=PRECISION, out_dtype=ACC)
        else:
            yv = tl.load(Y + h * syh + cols[:, None] * sym + do[None, :] * syd,
                         mask=col_ok[:, None] & do_ok[None, :], other=0.0)
            acc = tl.dot(ds, yv.to(ACC), acc, input_precision=PRECISION, out_dtype=ACC)
    if FOR_Y:
        tl.store(OUT + h * M * D + cols[:, None] * D + do[None, :], acc, mask=col_ok[:, None] & do_ok[None, :])
    else:
        tl.store(OUT + h * N * D + rows[:, None] * D + do[None, :], acc, mask=row_ok[:, None] & do_ok[None, :])


def launch_backward(x, y, tau, margin, targets, saved, grads, *, lse, hinge, hard, ws, cols, dystress, tau_min,
                    tau_max, need_x, need_y, need_tau, need_margin, cfg):
    """Gradients of x, y (kernels), tau and margin (O(N) closed forms); None for what is not needed.

    ``saved`` and ``grads`` map the ``Stats`` field names to the forward outputs and their upstream gradients
    (a gradient may be None: that statistic did not reach the loss)."""
    H, N, D = x.shape
    M = y.shape[1]
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    acc = tl.float64 if cdt == torch.float64 else tl.float32
    upcast = dot_upcast(x)
    # S tiles: as in the forward. dS·y: fp32 operands (bf16/fp16 inputs upcast exactly); TF32 for bf16/fp16 inputs
    # rounds dS to 10 mantissa bits on tensor cores (bf16 would keep 7); IEEE fp32 for fp32 inputs (the 1e-5 bar).
    s_precision = "ieee" if upcast or x.dtype in (torch.float32, torch.float64) else "tf32"
    precision = "ieee" if x.dtype in (torch.float32, torch.float64) else "tf32"

    def g(name, on=True):
        grad = grads.get(name)
        if not on or grad is None:
            return x.new_zeros((H, M if name.endswith("_c") else N), dtype=cdt)
        return grad.to(cdt).contiguous()

    g_pos = g("pos")
    g_lse, g_lse_c = g("lse", lse), g("lse_c", lse and cols)
    g_hinge, g_hinge_c = g("hinge", hinge), g("hinge_c", hinge and cols)
    g_hard, g_hard_c = g("hard", hard), g("hard_c", hard and cols)

    c_pos = g_pos
    if hinge:  # ∂hinge_i/∂pos_i = −cnt_i, and the column positive of j is pos_j
        c_pos = c_pos - saved["cnt"].to(cdt) * g_hinge
        if cols:
            c_pos = c_pos - saved["cnt_c"].to(cdt) * g_hinge_c

    dx = dy = dtau = dmargin = None
    if need_x or need_y:
        dummy = saved["pos"]  # any valid pointer for the arguments a configuration never reads
        pick = lambda name, on: saved[name] if on else dummy  # noqa: E731
        tau_arg = tau if tau is not None else dummy
        mar_arg = margin if margin is not None else dummy
        stau = tau.stride() if tau is not None else (0, 0)
        smar = margin.stride() if margin is not None else (0, 0)
        vectors = (targets, tau_arg, mar_arg, saved["pos"], pick("lse", lse), g_lse, g_hinge, c_pos, g_hard,
                   pick("arg", hard), pick("lse_c", lse and cols), g_lse_c, g_hinge_c, g_hard_c,
                   pick("arg_c", hard and cols))
        scalars = (N, M, D, float(tau_min), float(0.5 * (tau_max - tau_min)),
                   *x.stride(), *y.stride(), targets.stride(0), *stau, *smar)
        flags = dict(LSE_ON=lse, HINGE_ON=hinge, HARD_ON=hard, COLS=cols, DYSTRESS=dystress,
                     BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, BLOCK_DO=cfg.block_do,
                     ACC=acc, S_PRECISION=s_precision, PRECISION=precision, UPCAST=upcast, num_warps=cfg.num_warps)
        d_chunks = triton.cdiv(D, cfg.block_do)
        # tl.store rounds the fp32 sums to the input dtype (round to nearest even), except that the interpreter
        # truncates fp32 → bf16: there the sums are stored in fp32 and rounded by torch.
        out_dtype = torch.float32 if upcast else x.dtype
        if need_x:
            dx = torch.empty((H, N, D), dtype=out_dtype, device=x.device)
            grad_kernel[(triton.cdiv(N, cfg.block_n), d_chunks, H)](
                x, y, dx, *vectors, *scalars, FOR_Y=False, **flags)
            dx = dx.to(x.dtype)
        if need_y:
            dy = torch.empty((H, M, D), dtype=out_dtype, device=y.device)
            grad_kernel[(triton.cdiv(M, cfg.block_m), d_chunks, H)](
                x, y, dy, *vectors, *scalars, FOR_Y=True, **flags)
            dy = dy.to(y.dtype)

    if need_tau and tau is not None:
        if lse and not ws:
            raise RuntimeError("triton backend: the gradient of the temperature needs ws; request it (ws=True) "
                               "when the temperature requires grad")
        dtau = torch.zeros_like(tau, dtype=cdt)
        if lse:  # ∂lse_i/∂τ_i = −ws_i/τ_i², the column direction alike with τ_j
            num = g_lse * saved["ws"]
            if cols:
                num = num + g_lse_c * saved["ws_c"]
            dtau = -num / tau.to(cdt) ** 2
        dtau = dtau.to(tau.dtype)
    if need_margin and margin is not None:
        dmargin = torch.zeros(margin.shape, dtype=cdt, device=x.device)
        if hinge:  # ∂hinge_i/∂m_i = cnt_i
            dmargin = saved["cnt"].to(cdt) * g_hinge
            if cols:
                dmargin = dmargin + saved["cnt_c"].to(cdt) * g_hinge_c
        dmargin = dmargin.to(margin.dtype)
    return dx, dy, dtau, dmargin
