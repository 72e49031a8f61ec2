"""The top-k statistic: for each row of S = x yᵀ, the columns of its k largest entries among the row's negatives.

    topk_i = the k columns j ∉ {t_i, self_i} with the largest S_ij, by S_ij descending, ties → lowest column first

``t_i`` is row i's positive column (``targets``) and ``self_i`` (``self_cols``, optional) the anchor's own column when
x and y are the same rows (SimCLR's 2B anchors score against themselves). Only indices come back: a loss gathers
the k values it needs as ⟨x_i, y_j⟩ (O(N·k·D)), so its gradient is plain autograd and no backend needs a backward.
AMCL's k hardest negatives are this statistic.

Every backend implements ``compute_topk(x, y, targets, self_cols, k, deterministic) -> LongTensor [H, N, k]`` on
[H, N, D] / [H, M, D] inputs: the torch reference below materializes S (O(N·M)); ``cpp`` and ``triton`` stream the
tiles of S with a running top-k per row, extra memory O(N·k). The result is exact in the inputs' compute dtype
(fp32, fp64 for fp64 inputs), so two columns tie only when their S values are equal there; the fused backends'
tile products may round differently from torch.matmul's in fp32, which can swap columns whose S values are within
a rounding error of each other (fp64 and integer-valued inputs agree exactly). A NaN in S makes the row's order
unspecified.
"""
from __future__ import annotations

from numbers import Integral
from typing import Optional

import torch

from .stats import compute_dtype
from .validation import check_embedding_tensor, check_tensor_layout


def compute_topk(
    x: torch.Tensor,
    y: torch.Tensor,
    targets: torch.Tensor,
    k: int,
    *,
    self_cols: Optional[torch.Tensor] = None,
    backend: str = "auto",
    deterministic: Optional[bool] = None,
) -> torch.Tensor:
    """Columns of the k largest negatives of each row of S = x yᵀ: [N, k] (or [H, N, k] for [H, N, D] inputs).

    x [N, D] or [H, N, D]; y [M, D] or [H, M, D]; targets [N] integer positive columns (excluded);
    self_cols [N] integer or None, a second excluded column per row (the anchor itself); 1 ≤ k ≤ the number of
    columns left (M − 1, or M − 2 with self_cols). No gradient: gather the values you need from x and y.
    """
    x3, y3, has_heads = _check_inputs(x, y)
    N, M = x3.shape[1], y3.shape[1]
    targets = _check_columns("targets", targets, N, M, x3.device)
    if self_cols is not None:
        self_cols = _check_columns("self_cols", self_cols, N, M, x3.device)
    check_k(k, M - 1 - (self_cols is not None))
    if backend not in ("auto", "torch", "cpp", "triton"):
        raise ValueError(f"unknown backend {backend!r}; expected one of ('auto', 'torch', 'cpp', 'triton')")
    if deterministic is not None and not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool or None, got {type(deterministic).__name__}")
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    from . import backends  # the dispatch sits above the backends; this module's reference sits below them

    impl = backends.resolve(backend, x3.device)
    out = impl.compute_topk(x3, y3, targets, self_cols, int(k), deterministic)
    return out if has_heads else out[0]


def indexed_dot(a: torch.Tensor, b: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """out[h, i, q] = ⟨a[h, i], b[h, cols[h, i, q]]⟩ for a [H, N, P], b [H, M, P], cols [H, N, k]: the values at the
    top-k columns (s_q = S_{i, col}, or the φ codes' products), differentiable in a and b.

    Autograd through a plain gather would save the gathered rows, [H, N, k, P] — for AMCL's k = 100 more than S
    itself. Here the rows are gathered in chunks of rows, in the forward and again in the backward
    (∂a_i = Σ_q g_iq b_{c_iq};  ∂b_c = Σ_{(i,q): c_iq = c} g_iq a_i, an index_add), and only a, b and cols are saved:
    extra memory O(H·N·k) plus one chunk. First-order only, like the fused statistics."""
    # a is b (SimCLR: the anchors are the columns): one input, whose gradient gets both parts; torch.compile
    # cannot trace an autograd.Function that receives the same tensor twice
    return _IndexedDot.apply(a, None if b is a else b, cols)


_CHUNK_ELEMENTS = 1 << 22  # gathered elements per chunk of rows (16 MB in fp32)


def _row_chunks(a: torch.Tensor, k: int):
    H, N, P = a.shape
    rows = max(1, _CHUNK_ELEMENTS // max(1, H * k * P))
    return [slice(r, min(N, r + rows)) for r in range(0, N, rows)]


def _gather(b: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """b [H, M, P] at cols [H, n, k] → [H, n, k, P]."""
    H, n, k = cols.shape
    P = b.shape[-1]
    return b.gather(1, cols.reshape(H, n * k, 1).expand(H, n * k, P)).view(H, n, k, P)


class _IndexedDot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, cols):  # b None: b is a
        ctx.save_for_backward(a, b, cols)
        b = a if b is None else b
        out = a.new_empty(cols.shape)
        for r in _row_chunks(a, cols.shape[-1]):
            out[:, r] = (a[:, r].unsqueeze(2) * _gather(b, cols[:, r])).sum(-1)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        a, b, cols = ctx.saved_tensors
        same = b is None
        b = a if same else b
        H, M, P = b.shape
        da = torch.zeros_like(a) if ctx.needs_input_grad[0] else None
        need_db = ctx.needs_input_grad[0] if same else ctx.needs_input_grad[1]
        db = torch.zeros(H * M, P, dtype=b.dtype, device=b.device) if need_db else None
        head_offset = (torch.arange(H, device=b.device) * M).view(H, 1, 1)
        for r in _row_chunks(a, cols.shape[-1]):
            gr = g[:, r].unsqueeze(-1)  # [H, n, k, 1]
            if da is not None:
                da[:, r] = (gr * _gather(b, cols[:, r])).sum(2)
            if db is not None:
                contrib = (gr * a[:, r].unsqueeze(2)).reshape(-1, P)
                db.index_add_(0, (cols[:, r] + head_offset).reshape(-1), contrib)
        db = None if db is None else db.view(H, M, P)
        if same:
            return da + db, None, None
        return da, db, None


def check_k(k, available: int, name: str = "k") -> None:
    """1 ≤ k ≤ ``available`` (the negatives a row has)."""
    if isinstance(k, bool) or not isinstance(k, Integral):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"{name} must be >= 1, got {k}")
    if k > available:
        raise ValueError(f"{name}={k} exceeds the {available} negatives each row has")


def torch_topk(x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor, self_cols: Optional[torch.Tensor],
               k: int, deterministic: bool = False) -> torch.Tensor:
    """The reference: S materialized in the compute dtype, excluded columns set to −inf, a stable descending sort
    (equal values keep their column order: lowest column first), the first k. x [H, N, D], y [H, M, D]."""
    del deterministic  # a stable sort is deterministic
    cdt = compute_dtype(x.dtype)
    S = torch.matmul(x.to(cdt), y.to(cdt).transpose(-1, -2))  # [H, N, M]
    H, N, M = S.shape
    cols = torch.arange(M, device=S.device).view(1, M)
    excluded = cols == targets.view(N, 1)
    if self_cols is not None:
        excluded = excluded | (cols == self_cols.view(N, 1))
    S = S.masked_fill(excluded.unsqueeze(0), float("-inf"))
    return torch.sort(S, dim=2, descending=True, stable=True).indices[:, :, :k].contiguous()


def _check_inputs(x, y):
    for name, t in (("x", x), ("y", y)):
        check_embedding_tensor(name, t)
    if x.dim() != y.dim() or x.dtype != y.dtype or x.device != y.device:
        raise ValueError(f"x and y must agree in rank, dtype and device: x is {tuple(x.shape)} {x.dtype} "
                         f"{x.device}, y is {tuple(y.shape)} {y.dtype} {y.device}")
    has_heads = x.dim() == 3
    x3, y3 = (x, y) if has_heads else (x.unsqueeze(0), y.unsqueeze(0))
    if x3.shape[0] != y3.shape[0] or x3.shape[2] != y3.shape[2]:
        raise ValueError(f"x and y must have the same heads H and embedding size D, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if min(x3.shape) < 1 or y3.shape[1] < 1:
        raise ValueError(f"x and y must be non-empty, got {tuple(x.shape)} and {tuple(y.shape)}")
    return x3, y3, has_heads


def _check_columns(name: str, cols, N: int, M: int, device) -> torch.Tensor:
    if not isinstance(cols, torch.Tensor) or cols.dtype.is_floating_point or cols.dtype == torch.bool \
            or cols.is_complex():
        raise TypeError(f"{name} must be an integer torch.Tensor, got "
                        f"{cols.dtype if isinstance(cols, torch.Tensor) else type(cols).__name__}")
    check_tensor_layout(name, cols)
    if cols.shape != (N,):
        raise ValueError(f"{name} must have shape [N] = [{N}], got {tuple(cols.shape)}")
    if cols.device != device:
        raise ValueError(f"{name} must be on the device of x ({device}), got {cols.device}")
    if N > 0 and not torch.compiler.is_compiling():
        lo, hi = int(cols.min()), int(cols.max())
        if lo < 0 or hi >= M:
            raise ValueError(f"{name} must lie in [0, M) = [0, {M}), got values in [{lo}, {hi}]")
    return cols.long().contiguous()
