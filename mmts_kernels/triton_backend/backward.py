"""Backward: recompute the tiles of S, form ∂L/∂S a panel of columns at a time, and let two GEMMs per panel turn
it into dx = dS·y and dy = dSᵀ·x (DESIGN §3).

With the upstream gradients g of the statistics (row i, column j of the symmetric case; zero where not requested):

    dS_ij =  g^lse_i · p_ij / τ_ij                 p_ij  = exp(S_ij/τ_ij − lse_i)      (τ_ij detached: DySTreSS)
           + g^hinge_i · 1[j ≠ t_i, m_i + S_ij − pos_i > 0]
           + c_i · 1[j = t_i]                      c_i   = g^pos_i − cnt_i g^hinge_i − cnt^c_i g^hinge,c_i
           + g^hard_i · 1[j = arg_i]
           + g^lse,c_j · p^c_ij / τ_j              p^c_ij = exp(S_ij/τ_j − lse^c_j)
           + g^hinge,c_j · 1[i ≠ j, m_j + S_ij − pos_j > 0]
           + g^hard,c_j · 1[i = arg^c_j]
           + g^sig_i · (−z_ij σ(−z_ij u_ij)) / τ_i      u_ij  = S_ij/τ_i + b_i (the sigmoid statistic)

NT-Xent (row direction): p_ij = 0 at row i's excluded entries (its self column, and t_i when decoupled) and the
hinge skips the self column. DySTreSS with detach=False (DYS_GRAD): 1/τ_ij becomes the slope of S/τ(S),
(τ − S·τ'(S))/τ², in both directions. Labels "mask": dS_ij = 0 wherever row i (and, square, column j) leaves the
same-label entry out, which is the same set for every statistic, so it is applied once at the end of the tile.
(the −cnt g^hinge terms are ∂hinge/∂pos; in the symmetric case the column positive S_jj is pos_j, so both
directions fold into the one coefficient c on S_{i,t_i}). The one-element terms (positive, hardest negative) are
added inside the tile, where they cost a compare and a select: applied afterwards they would need a scatter into
dy with repeated targets (atomics, not reproducible). Temperatures and margins get O(N) closed forms on the host:
∂lse_i/∂τ_i = −ws_i/τ_i², ∂hinge_i/∂m_i = cnt_i. The sigmoid's τ and bias need sums over j of the per-element
a_ij = g^sig_i · (−z_ij σ(−z_ij u_ij)): ∂/∂b_i = Σ_j a_ij, ∂/∂τ_i = −Σ_j a_ij S_ij / τ_i²; the ds kernel has a_ij in
registers, so it stores both row sums per tile (SIG_SUMS, only when τ or the bias requires grad), summed on the host
in a fixed order (the forward would pay two more reductions whether or not they are needed, and it spills then).

Why a panel and two GEMMs. A fused kernel must hold its whole output block (BLOCK_N × D in fp32) while it sweeps
the other axis, and for D ≥ 256 that does not fit in registers: the previous design recomputed S once per D slice
(8× at D = 512) and ran the products on CUDA cores. Here ``ds_kernel`` (grid: row blocks × column blocks of the
panel × heads) recomputes each S tile once, applies the formula above in registers and stores dS for a panel of P
columns in the GEMM dtype (bf16/fp16 for those inputs, as flash-attention feeds its second product; fp32/fp64
otherwise). Then, per head, cuBLAS does

    dx    += dS[:, panel] · y[panel]      (fp32 accumulator across panels)
    dy[panel] = dS[:, panel]ᵀ · x          (complete: every row is in the panel)

P ≈ 2·D (``panel_width``) keeps the panel at about one copy of x and y: extra memory O((N + M)·D), never N·M.
fp16: dS is scaled by a power of two that brings its largest possible magnitude to ≤ 1 (p_ij/τ of a batch of
16k rows underflows fp16 otherwise), and the products are unscaled exactly afterwards.
fp32 inputs follow PyTorch's matmul precision (``dot_precision``): "tf32x3" ("highest") →
three TF32 products on split operands (hi·hi + hi·lo + lo·hi, fp32-accurate), "tf32" → TF32, as torch.matmul.

Work and traffic (the whole backward): 2·N·M·D FLOPs recomputing S in Triton + 4·N·M·D in the GEMMs (the
floor of a fused backward: 6·N·M·D); dS written once and read twice (N·M elements in the GEMM dtype, the
panel mostly from L2); dx's fp32 accumulator read and written once per panel (2·N·D·4 bytes · M/P).
"""
from __future__ import annotations

import contextlib
import math
import threading

import torch
import triton
import triton.language as tl

from ._tiles import (dystress_slope, dystress_tau, exact_positive, excluded_lse, label_match, logits, s_tile,
                     softplus_sigmoid, tile_has_positive)
from .forward import dot_precision, dot_upcast, dystress_params, kernel_types, panel_width


@triton.jit
def ds_tile(S, h, rows, cols, row_ok, col_ok, N, M, t, has_pos_tile,
            TAU, stau_h, stau_n, MARGIN, smar_h, smar_n, POS,
            LSE, G_LSE, G_HINGE, C_POS, G_HARD, ARG,
            LSE_C, G_LSE_C, G_HINGE_C, G_HARD_C, ARG_C,
            DYS, SELF, BIAS, sb_h, sb_n, G_SIG, LX, LY, R_SIG_B, R_SIG_S, r_part,
            LSE_ON: tl.constexpr, HINGE_ON: tl.constexpr, HARD_ON: tl.constexpr, COLS: tl.constexpr,
            DYSTRESS: tl.constexpr, ACC: tl.constexpr, FAST: tl.constexpr,
            MASK_SELF: tl.constexpr, DECOUPLED: tl.constexpr, DYS_GRAD: tl.constexpr,
            SIG_ON: tl.constexpr, SIG_SUMS: tl.constexpr, LABELS: tl.constexpr):
    """∂L/∂S on one tile (the formula in the module docstring), zero outside the matrix; ``t``: the rows' targets.

    Labels (LABELS 1, "mask"): every statistic of row i and, in the square case, of column j leaves out the same
    entries, drop_ij = same_ij ∧ j ≠ t_i, and none of the one-element terms (positive, hardest negative) can sit
    there, so ∂L/∂S is zeroed on drop once, at the end: the [BLOCK_N, BLOCK_M] mask is then not live across the
    tile's math (DySTreSS with its gradient through τ spills otherwise). The sigmoid's row sums need it earlier."""
    rv = h * N + rows  # row vectors are [H, N] contiguous, column vectors [H, M]
    cv = h * M + cols
    rows32, cols32 = rows.to(tl.int32), cols.to(tl.int32)  # int32 compares: half the registers of int64
    is_pos = cols32[None, :] == t.to(tl.int32)[:, None]
    is_self = is_pos  # a placeholder unless MASK_SELF
    if MASK_SELF:
        is_self = cols32[None, :] == tl.load(SELF + rows, mask=row_ok, other=-1).to(tl.int32)[:, None]
    c_pos = tl.load(C_POS + rv, mask=row_ok, other=0.0)
    ds = tl.where(is_pos, c_pos[:, None], 0.0).to(ACC)
    if LSE_ON:  # the logits exactly as the forward built them (see _tiles.logits)
        lse_r = tl.load(LSE + rv, mask=row_ok, other=0.0)
        g_r = tl.load(G_LSE + rv, mask=row_ok, other=0.0)
        if DYSTRESS:
            tau_r = dystress_tau(S, tl.load(DYS), tl.load(DYS + 1))
            z = logits(S, tau_r, FAST)
        else:
            tau_v = tl.load(TAU + h * stau_h + rows * stau_n, mask=row_ok, other=1.0).to(ACC)
            tau_r = tau_v[:, None]
            z = logits(S, tau_r, FAST)
            if has_pos_tile:
                z = exact_positive(z, S, is_pos & row_ok[:, None] & col_ok[None, :], tau_v, 1, FAST)
        p = tl.exp(z - lse_r[:, None])
        if MASK_SELF or DECOUPLED:
            p = tl.where(excluded_lse(is_pos, is_self, MASK_SELF, DECOUPLED), 0.0, p)
        if DYS_GRAD:  # the gradient also flows through τ(S): both directions' weights times one slope, below
            weight = g_r[:, None] * p
        else:
            ds += g_r[:, None] * p / tau_r
        if COLS:  # τ_j of column j: a per-sample τ has N = M entries only in this square case
            if DYSTRESS:
                tau_c = tau_r
                zc = z
            else:
                tau_w = tl.load(TAU + h * stau_h + cols * stau_n, mask=col_ok, other=1.0).to(ACC)
                tau_c = tau_w[None, :]
                zc = logits(S, tau_c, FAST)
                if has_pos_tile:
                    zc = exact_positive(zc, S, is_pos & row_ok[:, None] & col_ok[None, :], tau_w, 0, FAST)
            lse_c = tl.load(LSE_C + cv, mask=col_ok, other=0.0)
            g_c = tl.load(G_LSE_C + cv, mask=col_ok, other=0.0)
            if DYS_GRAD:
                weight += g_c[None, :] * tl.exp(zc - lse_c[None, :])
            else:
                ds += g_c[None, :] * tl.exp(zc - lse_c[None, :]) / tau_c
        if DYS_GRAD:  # the slope of S/τ(S), (τ − S·τ'(S))/τ², computed once z is no longer needed
            ds += weight * dystress_slope(S, tau_r, tl.load(DYS + 1))
    if HINGE_ON:
        mar_r = tl.load(MARGIN + h * smar_h + rows * smar_n, mask=row_ok, other=0.0).to(ACC)
        pos_r = tl.load(POS + rv, mask=row_ok, other=0.0)
        gh_r = tl.load(G_HINGE + rv, mask=row_ok, other=0.0)
        v = mar_r[:, None] + S - pos_r[:, None]
        if MASK_SELF:
            ds += tl.where(~is_pos & ~is_self & (v > 0), gh_r[:, None], 0.0)
        else:
            ds += tl.where(~is_pos & (v > 0), gh_r[:, None], 0.0)
        if COLS:
            mar_c = tl.load(MARGIN + h * smar_h + cols * smar_n, mask=col_ok, other=0.0).to(ACC)
            pos_c = tl.load(POS + h * N + cols, mask=col_ok, other=0.0)
            gh_c = tl.load(G_HINGE_C + cv, mask=col_ok, other=0.0)
            vc = mar_c[None, :] + S - pos_c[None, :]
            ds += tl.where((rows32[:, None] != cols32[None, :]) & (vc > 0), gh_c[None, :], 0.0)
    if HARD_ON:
        a_r = tl.load(ARG + rv, mask=row_ok, other=-1)
        gd_r = tl.load(G_HARD + rv, mask=row_ok, other=0.0)
        ds += tl.where(cols32[None, :] == a_r.to(tl.int32)[:, None], gd_r[:, None], 0.0)
        if COLS:
            a_c = tl.load(ARG_C + cv, mask=col_ok, other=-1)
            gd_c = tl.load(G_HARD_C + cv, mask=col_ok, other=0.0)
            ds += tl.where(rows32[:, None] == a_c.to(tl.int32)[None, :], gd_c[None, :], 0.0)
    if SIG_ON:  # g^sig_i · (−z_ij σ(−z_ij u_ij)) / τ_i, u rebuilt as the forward built it
        tau_s = tl.load(TAU + h * stau_h + rows * stau_n, mask=row_ok, other=1.0).to(ACC)
        b_s = tl.load(BIAS + h * sb_h + rows * sb_n, mask=row_ok, other=0.0).to(ACC)
        g_s = tl.load(G_SIG + rv, mask=row_ok, other=0.0)
        u = logits(S, tau_s[:, None], FAST) + b_s[:, None]
        if LABELS != 0:
            same = label_match(LX, LY, rows, cols, row_ok, col_ok)
        if LABELS == 2:
            positive = is_pos | same
        else:
            positive = is_pos
        _, sg = softplus_sigmoid(tl.where(positive, -u, u))
        du = g_s[:, None] * tl.where(positive, -sg, sg)  # ∂(g·sig_i)/∂u_ij
        keep = row_ok[:, None] & col_ok[None, :]
        if MASK_SELF:
            keep = keep & ~is_self
        if LABELS == 1:
            keep = keep & (~same | is_pos)
        du = tl.where(keep, du, 0.0)
        ds += logits(du, tau_s[:, None], FAST)
        if SIG_SUMS:  # ∂/∂b_i = Σ_j du_ij, ∂/∂τ_i = −Σ_j du_ij S_ij / τ_i²: this tile's share of both sums
            tl.store(R_SIG_B + r_part, tl.sum(du, axis=1), mask=row_ok)
            tl.store(R_SIG_S + r_part, tl.sum(du * S, axis=1), mask=row_ok)
    keep = row_ok[:, None] & col_ok[None, :]
    if LABELS == 1:  # loaded here, not above: int64 labels of the tile's columns take registers
        keep = keep & (~label_match(LX, LY, rows, cols, row_ok, col_ok) | is_pos)
    return tl.where(keep, ds, 0.0)


@triton.jit(do_not_specialize=["N", "M", "cb0", "P", "st", "stau_h", "stau_n", "smar_h", "smar_n", "sb_h", "sb_n"])
def ds_kernel(
    X, Y, DS, SCALE,
    T, TAU, MARGIN, POS, LSE, G_LSE, G_HINGE, C_POS, G_HARD, ARG, LSE_C, G_LSE_C, G_HINGE_C, G_HARD_C, ARG_C,
    N, M, D, cb0, P, DYS, SELF, BIAS, G_SIG, LX, LY, R_SIG_B, R_SIG_S,   # R_SIG_*: row partials [H, P/BLOCK_M, N]
    sxh, sxn, sxd, syh, sym, syd, st, stau_h, stau_n, smar_h, smar_n, sb_h, sb_n,
    LSE_ON: tl.constexpr, HINGE_ON: tl.constexpr, HARD_ON: tl.constexpr, COLS: tl.constexpr,
    DYSTRESS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr,
    MASK_SELF: tl.constexpr = False, DECOUPLED: tl.constexpr = False, DYS_GRAD: tl.constexpr = False,
    SIG_ON: tl.constexpr = False, SIG_SUMS: tl.constexpr = False, LABELS: tl.constexpr = 0,
):
    """DS[h, rows, cols − first column of the panel] = SCALE · ∂L/∂S on one tile, in DS's dtype; [H, N, P]."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    rows = r * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    local = c * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = cb0 * BLOCK_M + local
    row_ok = rows < N
    col_ok = cols < M
    S = s_tile(X, Y, h, rows, cols, N, M, D, sxh, sxn, sxd, syh, sym, syd,
               BLOCK_N, BLOCK_M, BLOCK_D, ACC, PRECISION, UPCAST)
    if COLS:
        t = rows
    else:
        t = tl.load(T + rows * st, mask=row_ok, other=0).to(tl.int64)
    c_lo = (cb0 + c) * BLOCK_M
    has_pos_tile = tile_has_positive(t, row_ok, r * BLOCK_N, c_lo, BLOCK_N, BLOCK_M, COLS)
    ds = ds_tile(S, h, rows, cols, row_ok, col_ok, N, M, t, has_pos_tile,
                 TAU, stau_h, stau_n, MARGIN, smar_h, smar_n, POS,
                 LSE, G_LSE, G_HINGE, C_POS, G_HARD, ARG,
                 LSE_C, G_LSE_C, G_HINGE_C, G_HARD_C, ARG_C,
                 DYS, SELF, BIAS, sb_h, sb_n, G_SIG, LX, LY, R_SIG_B, R_SIG_S, (h * (P // BLOCK_M) + c) * N + rows,
                 LSE_ON, HINGE_ON, HARD_ON, COLS, DYSTRESS, ACC, FAST, MASK_SELF, DECOUPLED, DYS_GRAD, SIG_ON,
                 SIG_SUMS, LABELS)
    ds = ds * tl.load(SCALE).to(ACC)
    tl.store(DS + (h * N + rows[:, None]) * P + local[None, :], ds, mask=row_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------------------------------
# Host side: the GEMMs of a panel.

def _gemm_dtype(x: torch.Tensor, cdt: torch.dtype) -> torch.dtype:
    """The dtype dS is stored in and the GEMMs read: the input dtype for bf16/fp16 on a GPU (tensor cores), else
    the statistics dtype (fp32 or fp64; on the CPU also for bf16/fp16, whose matmuls there are slow or absent)."""
    if x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16):
        return x.dtype
    return cdt


def _tf32_split(a: torch.Tensor):
    """a = hi + lo with hi rounded to TF32 (10 explicit mantissa bits), both exactly representable in fp32."""
    hi = ((a.view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)
    return hi, a - hi


_TF32_TOGGLE = threading.Lock()


@contextlib.contextmanager
def _tf32_products():
    """TF32 for the cuBLAS products inside the block, through whichever of PyTorch's two APIs is in use (setting the
    legacy one after the per-backend one was used would make the legacy getter raise for the user). The setting is
    process-wide: the lock keeps two of our backward passes from interleaving save and restore."""
    with _TF32_TOGGLE:
        try:
            previous = torch.get_float32_matmul_precision()

            def put(value):
                torch.set_float32_matmul_precision(value)
            on = "high"
        except RuntimeError:
            matmul_api = torch.backends.cuda.matmul
            previous = matmul_api.fp32_precision

            def put(value):
                matmul_api.fp32_precision = value
            on = "tf32"
        put(on)
        try:
            yield
        finally:
            put(previous)


_FP32_OUTPUT = {}  # device type → whether torch.mm/addmm(..., out_dtype=fp32) takes 16-bit operands there


def _fp32_output_supported(a: torch.Tensor) -> bool:
    """Probed once per device type on tiny tensors, so a real failure later (say, out of memory) is raised, not
    mistaken for a missing feature. Without it (a torch before out_dtype), each panel product is rounded to the
    16-bit dtype before it is accumulated in fp32."""
    kind = a.device.type
    if kind not in _FP32_OUTPUT:
        small = torch.ones((2, 2), dtype=a.dtype, device=a.device)
        acc = torch.zeros((2, 2), dtype=torch.float32, device=a.device)
        try:
            torch.mm(small, small, out_dtype=torch.float32, out=acc)
            torch.addmm(acc, small, small, out_dtype=torch.float32, out=acc)
            _FP32_OUTPUT[kind] = bool(acc.eq(4.0).all())
        except (TypeError, RuntimeError, NotImplementedError):
            _FP32_OUTPUT[kind] = False
    return _FP32_OUTPUT[kind]


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool, split_tf32: bool = False) -> None:
    """out (+)= a @ b, accumulated in out's dtype (fp32 out from bf16/fp16 operands: cuBLAS's fp32 output mode).
    ``split_tf32`` (fp32 on a GPU under "highest"): the three-TF32 split, fp32-accurate at tensor-core speed.
    Otherwise torch.matmul as it is (TF32 under "high"/"medium", like PyTorch's own products)."""
    if split_tf32:
        (a_hi, a_lo), (b_hi, b_lo) = _tf32_split(a), _tf32_split(b)
        with _tf32_products():
            matmul(a_hi, b_hi, out, accumulate)
            matmul(a_hi, b_lo, out, True)
            matmul(a_lo, b_hi, out, True)
        return
    if a.dtype != out.dtype:  # bf16/fp16 operands, fp32 result
        if _fp32_output_supported(a):
            if accumulate:
                torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
            else:
                torch.mm(a, b, out_dtype=out.dtype, out=out)
            return
        product = (a @ b).to(out.dtype)
        if accumulate:
            out.add_(product)
        else:
            out.copy_(product)
    elif accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


def grad_scale(x, grads, tau, cdt, dystress, tau_min, slope_bound=None):
    """A power of two s with |s·dS| ≤ 1 everywhere (fp16 only; 1 otherwise), as a 1-element device tensor (no
    host sync). |dS_ij| ≤ Σ of its coefficients' largest magnitudes, with p ≤ 1 and τ ≥ its smallest value.
    ``slope_bound`` (DySTreSS with detach=False): a bound on |S·τ'(S)|/τ², the slope's part beyond 1/τ."""
    one = torch.ones(1, dtype=cdt, device=x.device)
    if x.dtype != torch.float16:
        return one
    bound = one * 2.0 ** -14  # never scale a tiny bound into fp16's subnormals
    for name, g in grads.items():
        if name in ("lse", "lse_c", "sig"):  # |σ| ≤ 1: sig's coefficient is at most |g|/τ too
            low = torch.as_tensor(tau_min, dtype=cdt, device=x.device) if dystress else tau.abs().amin()
            bound = bound + g.abs().amax() / low
            if slope_bound is not None:
                bound = bound + g.abs().amax() * slope_bound
        else:
            bound = bound + g.abs().amax()
    return torch.exp2(-torch.ceil(torch.log2(bound))).reshape(1)


def launch_backward(x, y, tau, margin, targets, saved, grads, *, lse, hinge, hard, ws, cols, dystress, tau_min,
                    tau_max, need_x, need_y, need_tau, need_margin, cfg, self_cols=None, decoupled=False,
                    dys_grad=False, bias=None, labels_x=None, labels_y=None, sigmoid=False, same_label=0,
                    need_bias=False):
    """Gradients of x, y (kernel + GEMMs), tau, margin and bias (O(N) closed forms); None for what is not needed.

    ``saved`` and ``grads`` map the op's field names (op.FIELDS) to the forward outputs and their upstream
    gradients (a gradient may be None: that statistic did not reach the loss). The sigmoid's τ and bias gradients
    are row sums of the tiles' ∂L/∂u (``ds_kernel`` with SIG_SUMS), so they too run the kernel."""
    H, N, D = x.shape
    M = y.shape[1]
    cdt, acc, fast = kernel_types(x)
    upcast, precision = dot_upcast(x), dot_precision(x)
    split = precision == "tf32x3" and x.dtype == torch.float32  # the forward's S was fp32-accurate: so are these

    def g(name, on=True):
        grad = grads.get(name)
        if not on or grad is None:
            return x.new_zeros((H, M if name.endswith("_c") else N), dtype=cdt)
        return grad.to(cdt).contiguous()

    g_pos = g("pos")
    g_lse, g_lse_c = g("lse", lse), g("lse_c", lse and cols)
    g_hinge, g_hinge_c = g("hinge", hinge), g("hinge_c", hinge and cols)
    g_hard, g_hard_c = g("hard", hard), g("hard_c", hard and cols)
    g_sig = g("sig", sigmoid)

    c_pos = g_pos
    if hinge:  # ∂hinge_i/∂pos_i = −cnt_i, and the column positive of j is pos_j
        c_pos = c_pos - saved["cnt"].to(cdt) * g_hinge
        if cols:
            c_pos = c_pos - saved["cnt_c"].to(cdt) * g_hinge_c

    dx = dy = dtau = dmargin = dbias = None
    sig_sums = sigmoid and ((need_tau and tau is not None) or (need_bias and bias is not None))
    sig_b = sig_s = None  # Σ_j ∂L/∂u_ij and Σ_j ∂L/∂u_ij · S_ij per row, when τ or the bias needs them
    if need_x or need_y or sig_sums:
        coefficients = {"pos": c_pos, "hinge": g_hinge, "hinge_c": g_hinge_c, "hard": g_hard, "hard_c": g_hard_c}
        if lse:
            coefficients.update(lse=g_lse, lse_c=g_lse_c)
        if sigmoid:
            coefficients.update(sig=g_sig)
        slope_bound = None
        if dys_grad and dystress and x.dtype == torch.float16:  # |S| ≤ max‖x_i‖·max‖y_j‖, |τ'| ≤ ½(τ_max − τ_min)π
            s_max = x.to(cdt).norm(dim=-1).amax() * y.to(cdt).norm(dim=-1).amax()
            slope_bound = s_max * (0.5 * (tau_max - tau_min) * math.pi) / tau_min ** 2
        scale = grad_scale(x, coefficients, tau, cdt, dystress, tau_min, slope_bound)
        dummy = saved["pos"]  # any valid pointer for the arguments a configuration never reads
        dys = dystress_params(x, cdt, tau_min, tau_max) if dystress else dummy
        pick = lambda name, on: saved[name] if on else dummy  # noqa: E731
        tau_arg = tau if tau is not None else dummy
        mar_arg = margin if margin is not None else dummy
        stau = tau.stride() if tau is not None else (0, 0)
        smar = margin.stride() if margin is not None else (0, 0)
        sbias = bias.stride() if bias is not None else (0, 0)
        labels = (labels_x.contiguous(), labels_y.contiguous()) if same_label else (targets, targets)
        row_only = (self_cols.contiguous() if self_cols is not None else targets,
                    bias if bias is not None else dummy, g_sig, *labels)
        vectors = (targets, tau_arg, mar_arg, saved["pos"], pick("lse", lse), g_lse, g_hinge, c_pos, g_hard,
                   pick("arg", hard), pick("lse_c", lse and cols), g_lse_c, g_hinge_c, g_hard_c,
                   pick("arg_c", hard and cols))
        flags = dict(LSE_ON=lse, HINGE_ON=hinge, HARD_ON=hard, COLS=cols, DYSTRESS=dystress,
                     MASK_SELF=self_cols is not None, DECOUPLED=decoupled and lse, DYS_GRAD=dys_grad and dystress,
                     SIG_ON=sigmoid, SIG_SUMS=sig_sums, LABELS=same_label,
                     BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, ACC=acc, PRECISION=precision,
                     UPCAST=upcast, FAST=fast, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                     enable_fp_fusion=False)  # no FMA contraction: z − lse must round as in the forward
        gdt = _gemm_dtype(x, cdt)
        xg, yg = x.to(gdt), y.to(gdt)  # no copy on a GPU for bf16/fp16/fp32: the GEMMs read the inputs
        bm = cfg.block_m
        P = cfg.panel_blocks * bm or panel_width(N, M, cfg.bwd_panel_factor * D, N, bm)
        ds = torch.empty((H, N, P), dtype=gdt, device=x.device)
        num_c = triton.cdiv(M, bm)
        if sig_sums:  # one partial per row and column block of a panel, summed on the host in a fixed order
            part_b, part_s = (torch.empty((H, P // bm, N), dtype=cdt, device=x.device) for _ in range(2))
            sig_b, sig_s = (torch.zeros((H, N), dtype=cdt, device=x.device) for _ in range(2))
        else:
            part_b = part_s = dummy
        # Results land in the input dtype directly where the GEMM can write it (one rounding, as torch's own
        # backward); fp16 (scaled), several dx panels, and CPU bf16/fp16 go through an fp32/fp64 accumulator.
        direct = gdt == x.dtype and x.dtype != torch.float16
        dx_acc = dy_acc = None
        if need_x:
            dx_acc = torch.empty((H, N, D), dtype=x.dtype if direct and num_c * bm <= P else cdt, device=x.device)
        if need_y:
            dy_acc = torch.empty((H, M, D), dtype=y.dtype if direct else cdt, device=y.device)
        for cb0 in range(0, num_c, P // bm):
            c0, c1 = cb0 * bm, min(M, cb0 * bm + P)
            ds_kernel[(triton.cdiv(N, cfg.block_n), triton.cdiv(c1 - c0, bm), H)](
                x, y, ds, scale, *vectors, N, M, D, cb0, P, dys, *row_only, part_b, part_s,
                *x.stride(), *y.stride(), targets.stride(0), *stau, *smar, *sbias, **flags)
            if sig_sums:
                blocks = triton.cdiv(c1 - c0, bm)
                sig_b += part_b[:, :blocks].sum(1)
                sig_s += part_s[:, :blocks].sum(1)
            for h in range(H):
                panel = ds[h, :, : c1 - c0]
                if need_x:
                    matmul(panel, yg[h, c0:c1], dx_acc[h], accumulate=cb0 > 0, split_tf32=split)
                if need_y:
                    matmul(panel.t(), xg[h], dy_acc[h, c0:c1], accumulate=False, split_tf32=split)
        if x.dtype == torch.float16:
            unscale = 1.0 / scale  # exact: a power of two
            dx_acc = dx_acc.mul_(unscale) if need_x else None
            dy_acc = dy_acc.mul_(unscale) if need_y else None
        dx = dx_acc.to(x.dtype) if need_x else None
        dy = dy_acc.to(y.dtype) if need_y else None

    if need_tau and tau is not None:
        if lse and not ws:
            raise RuntimeError("triton backend: the gradient of the temperature needs ws; request it (ws=True) "
                               "when the temperature requires grad")
        num = torch.zeros(tau.shape, dtype=cdt, device=x.device)
        if lse:  # ∂lse_i/∂τ_i = −ws_i/τ_i², the column direction alike with τ_j
            num = num + g_lse * saved["ws"]
            if cols:
                num = num + g_lse_c * saved["ws_c"]
        if sigmoid:  # ∂(g·sig_i)/∂τ_i = −Σ_j ∂(g·sig_i)/∂u_ij · S_ij/τ_i²
            num = num + sig_s
        dtau = (-num / tau.to(cdt) ** 2).to(tau.dtype)
    if need_bias and bias is not None:
        dbias = (sig_b if sigmoid else torch.zeros(bias.shape, dtype=cdt, device=x.device)).to(bias.dtype)
    if need_margin and margin is not None:
        dmargin = torch.zeros(margin.shape, dtype=cdt, device=x.device)
        if hinge:  # ∂hinge_i/∂m_i = cnt_i
            dmargin = saved["cnt"].to(cdt) * g_hinge
            if cols:
                dmargin = dmargin + saved["cnt_c"].to(cdt) * g_hinge_c
        dmargin = dmargin.to(margin.dtype)
    return dx, dy, dtau, dmargin, dbias
