"""Forward: every requested statistic of S = x yᵀ in one pass over the tiles of S (DESIGN §3).

Grid (row blocks, heads). A program owns BLOCK_N rows of one head and sweeps the column tiles of y; each S tile is
computed once with tl.dot and folded into

    rows i (in registers, this program only)        columns j (square symmetric case, shared in global memory)
    m_i, l_i   online log-sum-exp of z_ij = S_ij/τ_ij   the same over i of z_ij = S_ij/τ_j (τ_ij under DySTreSS)
    w_i        Σ_j e^{z_ij − m_i} S_ij  → ws_i = w_i/l_i   alike
    hinge_i, cnt_i over j ≠ t_i of m_i + S_ij − pos_i  over i ≠ j of m_j + S_ij − pos_j
    hard_i, arg_i  max over j ≠ t_i, lowest column      max over i ≠ j, lowest row

The positives pos_i = x_i · y_{t_i} come first from a small O(N·D) kernel, because the hinge of every tile needs
them. The log-sum-exp keeps a running max (rescaling l and w by e^{m_old − m_new}), so any input scale and τ down to
1e-3 stay finite: there is no fixed shift that assumes unit-norm rows.

Column statistics, merged across row programs. A column j collects contributions from every row block, i.e. from
different programs. Per tile, the program reduces its BLOCK_N rows to a column partial (max, Σ e^{z − max}, …), then
merges it into an O(M) global state under a per-(head, column block) synchronization word:

  * default: a spin lock (atomic_cas 0→1, release with atomic_xchg). The merge of two log-sum-exp states
    (m, l) ⊕ (m', l') = (max, l e^{m−max} + l' e^{m'−max}) is exact in any order, so there is no overflow and no
    shift, but the order of the floating-point sums depends on scheduling. Programs start at different column
    blocks (rotated by their row block) so they rarely wait on the same lock. A lock holder never waits on
    anything, so there is no deadlock however many programs are resident.
  * deterministic=True: a turnstile. Column block c of head h is merged by row blocks 0, 1, 2, … in that order
    (program r waits until the word reads r, merges, writes r + 1), so every sum has a fixed order and the result
    is bitwise reproducible. Programs sweep the column blocks in the same order, so they form a pipeline one tile
    apart. This relies on row block r − 1 being scheduled no later than r (the hardware launches blocks in order
    of their linear id; the same assumption as a decoupled look-back scan).

Why not the alternatives: per-(row block, column) partials would be O(N·M/BLOCK_N) memory (ruled out, DESIGN §6);
a program that also owns a column block and sweeps it would compute every tile twice (a second pass over S).
Extra memory here is O(H·M) column state plus one int32 per (head, column block).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import dystress_tau, hardest, merge_hardest, relu_keep_nan, s_tile


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


@triton.jit
def stats_kernel(
    X, Y, T, TAU, MARGIN, POS,
    LSE, WS, HINGE, CNT, HARD, ARG,                          # row statistics, [H, N] contiguous
    C_MAX, C_SUM, C_WS, C_HINGE, C_CNT, C_HARD, C_ARG,       # column state, [H, M] contiguous
    SYNC,                                                    # [H, column blocks] int32, zero-initialized
    N, M, D, tau_min, tau_half_range,
    sxh, sxn, sxd, syh, sym, syd, st, stau_h, stau_n, smar_h, smar_n,
    LSE_ON: tl.constexpr, WS_ON: tl.constexpr, HINGE_ON: tl.constexpr, HARD_ON: tl.constexpr,
    COLS: tl.constexpr, DYSTRESS: tl.constexpr, DETERMINISTIC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    rows = r * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < N
    if COLS:
        t = rows  # square symmetric case: the positives are the diagonal
    else:
        t = tl.load(T + rows * st, mask=row_ok, other=0).to(tl.int64)
    pos_r = tl.load(POS + h * N + rows, mask=row_ok, other=0.0)
    if LSE_ON and not DYSTRESS:
        tau_r = tl.load(TAU + h * stau_h + rows * stau_n, mask=row_ok, other=1.0).to(ACC)
    if HINGE_ON:
        mar_r = tl.load(MARGIN + h * smar_h + rows * smar_n, mask=row_ok, other=0.0).to(ACC)

    neg_inf = float("-inf")
    m_run = tl.full((BLOCK_N,), neg_inf, ACC)
    l_run = tl.zeros((BLOCK_N,), ACC)
    w_run = tl.zeros((BLOCK_N,), ACC)
    hinge_run = tl.zeros((BLOCK_N,), ACC)
    cnt_run = tl.zeros((BLOCK_N,), tl.int64)
    pos_run = tl.zeros((BLOCK_N,), ACC)  # S_{i,t_i} as the tile computes it (see below)
    hard_run = tl.full((BLOCK_N,), neg_inf, ACC)
    arg_run = tl.zeros((BLOCK_N,), tl.int64) + M  # "no negative yet": above every column index

    num_c = tl.cdiv(M, BLOCK_M)
    for k in range(0, num_c):
        if DETERMINISTIC:
            c = k  # every program in the same order: the turnstile pipeline
        else:
            c = (k + r) % num_c  # staggered starts: fewer programs wait on the same column lock
        cols = c * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        col_ok = cols < M
        S = s_tile(X, Y, h, rows, cols, N, M, D, sxh, sxn, sxd, syh, sym, syd,
                   BLOCK_N, BLOCK_M, BLOCK_D, ACC, PRECISION, UPCAST)
        valid = row_ok[:, None] & col_ok[None, :]
        neg = valid & (cols[None, :] != t[:, None])  # the negatives of row i: j ≠ t_i

        # ---- rows: fold the tile into the running statistics of this program's rows
        if LSE_ON:
            # exactly one tile holds column t_i, and 0 + v = v: pos_run ends as that tile's S_{i,t_i}
            pos_run += tl.sum(tl.where(valid & (cols[None, :] == t[:, None]), S, 0.0), axis=1)
            if DYSTRESS:
                tau_ij = dystress_tau(S, tau_min, tau_half_range)
                z = S / tau_ij
            else:
                z = S / tau_r[:, None]
            z_row = tl.where(col_ok[None, :], z, neg_inf)
            m_new = tl.maximum(m_run, tl.max(z_row, axis=1))
            alpha = tl.exp(m_run - m_new)  # 0 on the first tile (m_run = −inf, m_new finite)
            e = tl.exp(z_row - m_new[:, None])
            l_run = l_run * alpha + tl.sum(e, axis=1)
            if WS_ON:
                w_run = w_run * alpha + tl.sum(e * S, axis=1)
            m_run = m_new
        if HINGE_ON:
            v = mar_r[:, None] + S - pos_r[:, None]
            hinge_run += tl.sum(tl.where(neg, relu_keep_nan(v), 0.0), axis=1)
            cnt_run += tl.sum((neg & (v > 0)).to(tl.int64), axis=1)
        if HARD_ON:
            t_max, t_arg = hardest(S, neg, cols[None, :], M, 1)
            # tiles arrive in rotated order, so ties compare the column index explicitly
            hard_run, arg_run = merge_hardest(t_max, t_arg, hard_run, arg_run)

        # ---- columns: reduce the tile over this program's rows, then merge into the shared column state
        if COLS:
            cptr = h * M + cols
            neg_c = valid & (rows[:, None] != cols[None, :])
            if LSE_ON:
                if DYSTRESS:
                    zc = z  # τ_ij is symmetric in the pair: the same logits
                else:
                    tau_c = tl.load(TAU + h * stau_h + cols * stau_n, mask=col_ok, other=1.0).to(ACC)
                    zc = S / tau_c[None, :]
                zc = tl.where(row_ok[:, None], zc, neg_inf)
                p_max = tl.max(zc, axis=0)
                ec = tl.exp(zc - p_max[None, :])
                p_sum = tl.sum(ec, axis=0)
                if WS_ON:
                    p_ws = tl.sum(ec * S, axis=0)
            if HINGE_ON:
                mar_c = tl.load(MARGIN + h * smar_h + cols * smar_n, mask=col_ok, other=0.0).to(ACC)
                pos_c = tl.load(POS + h * N + cols, mask=col_ok, other=0.0)
                vc = mar_c[None, :] + S - pos_c[None, :]
                p_hinge = tl.sum(tl.where(neg_c, relu_keep_nan(vc), 0.0), axis=0)
                p_cnt = tl.sum((neg_c & (vc > 0)).to(tl.int64), axis=0)
            if HARD_ON:
                p_hard, p_arg = hardest(S, neg_c, rows[:, None], N, 0)

            sync = SYNC + h * num_c + c
            if DETERMINISTIC:
                while tl.atomic_add(sync, 0, sem="acquire") != r.to(tl.int32):
                    pass
            else:
                while tl.atomic_cas(sync, 0, 1, sem="acquire") == 1:
                    pass
            # volatile loads: read what the previous holder released, not a stale cached copy
            if LSE_ON:
                o_max = tl.load(C_MAX + cptr, mask=col_ok, other=neg_inf, volatile=True)
                o_sum = tl.load(C_SUM + cptr, mask=col_ok, other=0.0, volatile=True)
                n_max = tl.maximum(o_max, p_max)
                a_old = tl.exp(o_max - n_max)  # 0 while the column is empty (o_max = −inf)
                a_new = tl.exp(p_max - n_max)
                tl.store(C_MAX + cptr, n_max, mask=col_ok)
                tl.store(C_SUM + cptr, o_sum * a_old + p_sum * a_new, mask=col_ok)
                if WS_ON:
                    o_ws = tl.load(C_WS + cptr, mask=col_ok, other=0.0, volatile=True)
                    tl.store(C_WS + cptr, o_ws * a_old + p_ws * a_new, mask=col_ok)
            if HINGE_ON:
                o_hinge = tl.load(C_HINGE + cptr, mask=col_ok, other=0.0, volatile=True)
                o_cnt = tl.load(C_CNT + cptr, mask=col_ok, other=0, volatile=True)
                tl.store(C_HINGE + cptr, o_hinge + p_hinge, mask=col_ok)
                tl.store(C_CNT + cptr, o_cnt + p_cnt, mask=col_ok)
            if HARD_ON:
                o_hard = tl.load(C_HARD + cptr, mask=col_ok, other=neg_inf, volatile=True)
                o_arg = tl.load(C_ARG + cptr, mask=col_ok, other=N, volatile=True)
                n_hard, n_arg = merge_hardest(p_hard, p_arg, o_hard, o_arg)
                tl.store(C_HARD + cptr, n_hard, mask=col_ok)
                tl.store(C_ARG + cptr, n_arg, mask=col_ok)
            tl.debug_barrier()  # every thread's stores are issued before the release below
            if DETERMINISTIC:
                tl.atomic_xchg(sync, (r + 1).to(tl.int32), sem="release")
            else:
                tl.atomic_xchg(sync, 0, sem="release")

    out = h * N + rows
    if LSE_ON:
        tl.store(LSE + out, m_run + tl.log(l_run), mask=row_ok)
        if not HINGE_ON:  # other programs read POS only for the column hinge
            # the positive the lse saw, bit for bit: lse_i − pos_i/τ_i then cancels its rounding, which the
            # pre-pass dot (another summation order) would not, an error amplified by 1/τ
            tl.store(POS + out, pos_run, mask=row_ok)
        if WS_ON:
            tl.store(WS + out, w_run / l_run, mask=row_ok)
    if HINGE_ON:
        tl.store(HINGE + out, hinge_run, mask=row_ok)
        tl.store(CNT + out, cnt_run, mask=row_ok)
    if HARD_ON:
        tl.store(HARD + out, hard_run, mask=row_ok)
        tl.store(ARG + out, arg_run, mask=row_ok)


def dot_upcast(x: torch.Tensor) -> bool:
    """The interpreter (CPU tensors) mishandles bf16: its tl.dot multiplies the raw bits and its fp32 → bf16 cast
    truncates. There bf16 tiles go to fp32 before tl.dot and bf16 gradients are rounded by torch. Not on a GPU."""
    return x.dtype == torch.bfloat16 and x.device.type != "cuda"


def launch_forward(x, y, tau, margin, targets, *, lse, hinge, hard, ws, cols, dystress, tau_min, tau_max,
                   deterministic, cfg):
    """Allocate the statistics (O(H·(N+M))), launch the two kernels, finish the column log-sum-exp.

    Returns the 13 tensors of ``Stats`` in field order; fields not requested are empty tensors."""
    H, N, D = x.shape
    M = y.shape[1]
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    acc = tl.float64 if cdt == torch.float64 else tl.float32
    upcast = dot_upcast(x)
    precision = "ieee" if upcast or x.dtype in (torch.float32, torch.float64) else "tf32"  # ignored for bf16/fp16

    pos = x.new_empty((H, N), dtype=cdt)
    pos_kernel[(triton.cdiv(N, cfg.block_n), H)](
        x, y, targets, pos, N, D, *x.stride(), *y.stride(), targets.stride(0),
        BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, ACC=acc, num_warps=cfg.num_warps)

    def rows(dtype=cdt, fill=None, on=True, n=N):
        if not on:  # a fresh empty tensor each: the outputs of a custom op must not alias each other
            return x.new_empty(0, dtype=dtype)
        return x.new_full((H, n), fill, dtype=dtype) if fill is not None else x.new_empty((H, n), dtype=dtype)

    lse_t, ws_t = rows(on=lse), rows(on=lse and ws)
    hinge_t, cnt_t = rows(on=hinge), rows(torch.int64, on=hinge)
    hard_t, arg_t = rows(on=hard), rows(torch.int64, on=hard)
    c_max = rows(fill=float("-inf"), on=cols and lse, n=M)
    c_sum, c_ws = rows(fill=0.0, on=cols and lse, n=M), rows(fill=0.0, on=cols and lse and ws, n=M)
    c_hinge, c_cnt = rows(fill=0.0, on=cols and hinge, n=M), rows(torch.int64, fill=0, on=cols and hinge, n=M)
    c_hard = rows(fill=float("-inf"), on=cols and hard, n=M)
    c_arg = rows(torch.int64, fill=N, on=cols and hard, n=M)
    num_c = triton.cdiv(M, cfg.block_m)
    sync = x.new_zeros((H, num_c) if cols else (0,), dtype=torch.int32)

    # unused pointer arguments get any valid tensor; their strides are never read
    tau_arg = tau if tau is not None else pos
    mar_arg = margin if margin is not None else pos
    stau = tau.stride() if tau is not None else (0, 0)
    smar = margin.stride() if margin is not None else (0, 0)
    half = 0.5 * (tau_max - tau_min)
    stats_kernel[(triton.cdiv(N, cfg.block_n), H)](
        x, y, targets, tau_arg, mar_arg, pos,
        lse_t, ws_t, hinge_t, cnt_t, hard_t, arg_t,
        c_max, c_sum, c_ws, c_hinge, c_cnt, c_hard, c_arg, sync,
        N, M, D, float(tau_min), float(half),
        *x.stride(), *y.stride(), targets.stride(0), *stau, *smar,
        LSE_ON=lse, WS_ON=lse and ws, HINGE_ON=hinge, HARD_ON=hard, COLS=cols, DYSTRESS=dystress,
        DETERMINISTIC=deterministic, BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d,
        ACC=acc, PRECISION=precision, UPCAST=upcast, num_warps=cfg.num_warps)

    lse_c, ws_c = rows(on=False), rows(on=False)
    if cols and lse:  # finish the column log-sum-exp in place: lse_c = max + log Σ, ws_c = w / Σ  (O(H·M))
        if ws:
            ws_c = c_ws.div_(c_sum)
        lse_c = c_sum.log_().add_(c_max)
    return (pos, lse_t, hinge_t, cnt_t, hard_t, arg_t, ws_t, lse_c, c_hinge, c_cnt, c_hard, c_arg, ws_c)
