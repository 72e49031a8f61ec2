"""The top-k statistic on Triton (mmts_kernels/topk.py): per row i of S = x yᵀ, the columns of the k largest S_ij
over j ∉ {t_i, self_i}, by value descending, ties → lowest column first. Indices only: no backward.

One program owns BLOCK_N rows of one head and streams the column tiles of S (width K_PAD, the power of two ≥ k),
keeping the row's best K_PAD entries in registers as sortable int64 keys:

    key_ij = (mono(S_ij) with its low COL bits cleared) | (MASK − j)       MASK = 2^COL − 1

``mono`` maps a float's bits to an integer in the same order (negative floats get their magnitude bits flipped),
so a larger key is a larger S_ij, and among equal S_ij the lower column. Excluded and out-of-range entries get a
key below every real one. Merge of the running best (sorted descending) with a tile's keys (sorted ascending): their
elementwise max holds the K_PAD largest of the union (the first half-cleaner step of a bitonic merge), sorted again
for the next tile. Extra memory: the [H, N, k] output only.

Exactness: fp32 S (fp32/bf16/fp16 inputs) sits in the high 32 bits whole (COL = 32). fp64 S gives up its COL =
bit_length(M − 1) lowest mantissa bits to the column, so two values within about 2^(COL−52) of each other
(relative) rank by column instead of by value; exact ties — the case that matters — still go to the lowest column.
K_PAD beyond MAX_FUSED_K (its registers would spill) takes a chunked, unfused path instead: rows in chunks, the
reference's masked stable sort on a chunk × M block of S (extra memory O(chunk·M), at most CHUNK_ELEMENTS).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from . import forward
from ._tiles import s_tile

MAX_FUSED_K = 256  # K_PAD above it: the chunked path (see launch_config)
CHUNK_ELEMENTS = 1 << 24  # the chunked path's S block: at most this many elements
_KEY_FLOOR = tl.constexpr(-9223372036854775807)  # below every real key (INT64_MIN + 1: a literal Triton takes)


@triton.jit
def sortable_key(S, cols, mask, IS_FP64: tl.constexpr):
    """An int64 per entry whose order is (S descending, column ascending) read as integers descending."""
    S = tl.where(S == 0, 0.0, S)  # −0.0 and +0.0 are equal values: one key, so the column decides
    if IS_FP64:
        bits = S.to(tl.int64, bitcast=True)
        mono = bits ^ ((bits >> 63) & 0x7FFFFFFFFFFFFFFF)
    else:
        bits32 = S.to(tl.float32).to(tl.int32, bitcast=True)
        mono = (bits32 ^ ((bits32 >> 31) & 0x7FFFFFFF)).to(tl.int64) << 32
    return (mono & ~mask) | (mask - cols[None, :])


@triton.jit
def topk_kernel(X, Y, T, SELF, OUT, N, M, D, K, mask,
                sxh, sxn, sxd, syh, sym, syd,
                HAS_SELF: tl.constexpr, IS_FP64: tl.constexpr, BLOCK_N: tl.constexpr, K_PAD: tl.constexpr,
                BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """OUT[h, i, :K] = the K best columns of row i (see the module docstring); grid (row blocks, heads)."""
    pid = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < N
    t = tl.load(T + rows, mask=row_ok, other=-1)
    if HAS_SELF:
        own = tl.load(SELF + rows, mask=row_ok, other=-1)
    else:
        own = t
    best = tl.full((BLOCK_N, K_PAD), _KEY_FLOOR, tl.int64)  # sorted descending
    for c0 in range(0, M, K_PAD):
        cols = c0 + tl.arange(0, K_PAD).to(tl.int64)
        S = s_tile(X, Y, h, rows, cols, N, M, D, sxh, sxn, sxd, syh, sym, syd,
                   BLOCK_N, K_PAD, BLOCK_D, ACC, PRECISION, UPCAST)
        ok = (cols[None, :] < M) & (cols[None, :] != t[:, None]) & (cols[None, :] != own[:, None])
        key = tl.where(ok, sortable_key(S, cols, mask, IS_FP64), _KEY_FLOOR)
        best = tl.sort(tl.maximum(best, tl.sort(key, dim=1)), dim=1, descending=True)
    col = mask - (best & mask)
    q = tl.arange(0, K_PAD).to(tl.int64)
    out = OUT + h * N * K + rows[:, None] * K + q[None, :]
    tl.store(out, col, mask=row_ok[:, None] & (q[None, :] < K))


def launch_topk(x, y, targets, self_cols, k: int):
    """[H, N, k] int64 from the fused kernel (K_PAD ≤ MAX_FUSED_K)."""
    H, N, D = x.shape
    M = y.shape[1]
    fp64 = x.dtype == torch.float64
    k_pad = max(16, triton.next_power_of_2(k))  # 16: tl.dot's smallest tile side
    mask = (1 << max(1, (M - 1).bit_length())) - 1 if fp64 else (1 << 32) - 1
    out = torch.empty((H, N, k), dtype=torch.int64, device=x.device)
    block_n, block_d, num_warps = launch_config(k_pad)
    grid = (triton.cdiv(N, block_n), H)
    topk_kernel[grid](
        x, y, targets, self_cols if self_cols is not None else targets, out, N, M, D, k, mask,
        *x.stride(), *y.stride(),
        HAS_SELF=self_cols is not None, IS_FP64=fp64, BLOCK_N=block_n, K_PAD=k_pad, BLOCK_D=block_d,
        ACC=tl.float64 if fp64 else tl.float32, PRECISION=forward.dot_precision(x), UPCAST=forward.dot_upcast(x),
        num_warps=num_warps,
    )
    return out


def launch_config(k_pad: int) -> tuple:
    """(BLOCK_N, BLOCK_D, num_warps). BLOCK_N = 16 rows (tl.dot's minimum): the running best, the tile's keys and
    the sort's temporaries are each BLOCK_N·K_PAD int64 in registers, spread over the warps. Compiled for sm_90
    (python_tests/triton_sm90.py): no spills up to K_PAD = 256 with 8 warps (about 180–220 registers); K_PAD = 512
    spills and its sort needs more shared memory than an H100 has, hence MAX_FUSED_K. BLOCK_D = 64 spills a few
    bytes at K_PAD = 16. The interpreter (programs run one after another): one warp, short D steps."""
    if type(topk_kernel).__name__ == "InterpretedFunction":
        return 16, 16, 1
    return 16, 32, 4 if k_pad <= 64 else 8


def chunked_topk(x, y, targets, self_cols, k: int):
    """The path for k > MAX_FUSED_K: the reference's masked stable sort, on row chunks of S."""
    from ..topk import torch_topk

    H, N, _ = x.shape
    chunk = max(1, CHUNK_ELEMENTS // max(1, H * y.shape[1]))
    parts = [torch_topk(x[:, r:r + chunk], y, targets[r:r + chunk],
                        None if self_cols is None else self_cols[r:r + chunk], k) for r in range(0, N, chunk)]
    return torch.cat(parts, dim=1)


@torch.library.custom_op("mmts_kernels::triton_topk", mutates_args=())
def triton_topk(x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor, self_cols: Optional[torch.Tensor],
                k: int) -> torch.Tensor:
    if max(16, triton.next_power_of_2(k)) > MAX_FUSED_K:
        return chunked_topk(x, y, targets, self_cols, k)
    return launch_topk(x, y, targets, self_cols, k)


@triton_topk.register_fake
def _(x, y, targets, self_cols, k):
    return x.new_empty((x.shape[0], x.shape[1], k), dtype=torch.int64)
