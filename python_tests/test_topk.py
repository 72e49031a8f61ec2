"""The top-k statistic (mmts_kernels/topk.py): every backend against a row-by-row Python selection written from the
definition — the k largest S_ij over j ∉ {t_i, self_i}, by value descending, ties to the lowest column — on random
and on integer-valued (tie-heavy) inputs; the fused paths' tiling (several row blocks and column tiles), the triton
chunked path, bad input, and no N×M allocation on cpp."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

import mmts_kernels.topk as topk_mod
from mmts_kernels.topk import compute_topk
from support import AllocationRecorder, backend_marker, test_device as device_for

BACKENDS = [pytest.param(b, marks=backend_marker(b)) for b in ("torch", "cpp", "triton")]


def selected_columns(x, y, targets, self_cols, k):
    """Row by row in Python floats: sort the allowed columns by (−S_ij, j), keep k. [H, N, k]."""
    S = (x.double() @ y.double().transpose(-1, -2)).tolist()
    out = []
    for h, rows in enumerate(S):
        head = []
        for i, row in enumerate(rows):
            banned = {int(targets[i])} | ({int(self_cols[i])} if self_cols is not None else set())
            allowed = [j for j in range(len(row)) if j not in banned]
            head.append(sorted(allowed, key=lambda j: (-row[j], j))[:k])
        out.append(head)
    return torch.tensor(out, dtype=torch.int64)


def make_inputs(H, N, M, D, seed, integer, dtype=torch.float64, with_self=True):
    g = torch.Generator().manual_seed(seed)
    if integer:  # small integers: products and sums are exact in every summation order, and ties are frequent
        x = torch.randint(-2, 3, (H, N, D), generator=g).to(dtype)
        y = torch.randint(-2, 3, (H, M, D), generator=g).to(dtype)
        x[x == 0] = 1  # never zeros
        y[y == 0] = -1
    else:
        x = torch.randn(H, N, D, generator=g, dtype=torch.float64).to(dtype)
        y = torch.randn(H, M, D, generator=g, dtype=torch.float64).to(dtype)
    targets = torch.randint(0, M, (N,), generator=g)
    self_cols = (targets + 1 + torch.randint(0, M - 1, (N,), generator=g)) % M if with_self else None
    return x, y, targets, self_cols


def run(backend, x, y, targets, self_cols, k):
    dev = device_for(backend)
    out = compute_topk(x.to(dev), y.to(dev), targets.to(dev), k,
                       self_cols=None if self_cols is None else self_cols.to(dev), backend=backend)
    return out.cpu()


@pytest.mark.parametrize("backend", BACKENDS)
@given(H=st.integers(1, 2), N=st.integers(1, 20), M=st.integers(3, 40), D=st.sampled_from([1, 2, 3, 5]),
       k=st.integers(1, 24), with_self=st.booleans(), integer=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_the_definition(backend, H, N, M, D, k, with_self, integer, seed):
    if backend == "triton":  # the interpreter sorts slowly: at most two row blocks and three column tiles
        N, M = min(N, 18), min(M, 34)
    k = min(k, M - 1 - with_self)
    x, y, targets, self_cols = make_inputs(H, N, M, D, seed, integer, with_self=with_self)
    want = selected_columns(x, y, targets, self_cols, k)
    assert torch.equal(run(backend, x, y, targets, self_cols, k), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs(backend, dtype):
    """Integer-valued low-precision inputs are exact in the fp32 scores: the same columns as the definition.
    Random fp32: the scores at the chosen columns equal the k largest (tile rounding may swap near-equal ones)."""
    x, y, targets, self_cols = make_inputs(1, 19, 37, 6, seed=3, integer=True, dtype=dtype)
    assert torch.equal(run(backend, x, y, targets, self_cols, 9), selected_columns(x, y, targets, self_cols, 9))
    x, y, targets, self_cols = make_inputs(1, 19, 37, 6, seed=4, integer=False, dtype=torch.float32)
    got = run(backend, x, y, targets, self_cols, 9)
    S = x.double() @ y.double().transpose(-1, -2)
    want = selected_columns(x, y, targets, self_cols, 9)
    torch.testing.assert_close(S.gather(2, got), S.gather(2, want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_head_axis_and_strided_inputs(backend):
    x, y, targets, self_cols = make_inputs(1, 13, 29, 4, seed=5, integer=False)
    xs = torch.empty(13, 8, dtype=torch.float64)[:, ::2].copy_(x[0])  # non-contiguous
    out = run(backend, xs, y[0].t().contiguous().t(), targets, self_cols, 5)
    assert out.shape == (13, 5)
    assert torch.equal(out, selected_columns(x, y, targets, self_cols, 5)[0])


@backend_marker("cpp")
@pytest.mark.parametrize("block", ["16x16", "7x5", "64x3"])
@pytest.mark.parametrize("k", [1, 4, 30])
def test_cpp_tiles_smaller_than_k(monkeypatch, block, k):
    """Row blocks and column tiles of every shape the C++ kernel can meet: tiles narrower than k, one row a block."""
    monkeypatch.setenv("MMTS_KERNELS_CPP_BLOCK", block)
    for integer in (False, True):
        x, y, targets, self_cols = make_inputs(2, 23, 41, 3, seed=k, integer=integer)
        assert torch.equal(run("cpp", x, y, targets, self_cols, k), selected_columns(x, y, targets, self_cols, k))


@backend_marker("triton")
def test_triton_chunked_path(monkeypatch):
    """k beyond the fused kernel's register budget takes the chunked path: forced here with a small budget."""
    from mmts_kernels.triton_backend import topk as triton_topk

    monkeypatch.setattr(triton_topk, "MAX_FUSED_K", 16)
    monkeypatch.setattr(triton_topk, "CHUNK_ELEMENTS", 2 * 40 * 3)  # three rows a chunk
    x, y, targets, self_cols = make_inputs(2, 10, 40, 3, seed=9, integer=True)
    assert torch.equal(run("triton", x, y, targets, self_cols, 20), selected_columns(x, y, targets, self_cols, 20))


@backend_marker("cpp")
def test_cpp_allocates_nothing_n_by_m():
    N, k = 512, 8
    x, y, targets, self_cols = make_inputs(1, N, N, 4, seed=1, integer=False, dtype=torch.float32)
    with AllocationRecorder() as rec:
        compute_topk(x, y, targets, k, self_cols=self_cols, backend="cpp")
    assert rec.largest()[1] <= N * k
    with AllocationRecorder() as rec:  # the recorder sees the reference's N×M
        compute_topk(x, y, targets, k, self_cols=self_cols, backend="torch")
    assert rec.largest()[1] >= N * N


def test_deterministic_flag_and_reference_are_stable():
    x, y, targets, self_cols = make_inputs(2, 9, 17, 2, seed=2, integer=True)
    a = compute_topk(x, y, targets, 6, self_cols=self_cols, backend="torch", deterministic=True)
    b = topk_mod.torch_topk(x, y, targets, self_cols, 6)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(k=0), ValueError, "k"),
    (dict(k=-3), ValueError, "k"),
    (dict(k=True), TypeError, "k"),
    (dict(k=2.0), TypeError, "k"),
    (dict(k=6), ValueError, "k=6 exceeds"),  # M = 7, self and positive excluded: 5 negatives
    (dict(targets=torch.arange(4)), ValueError, "targets"),
    (dict(targets=torch.full((5,), 7)), ValueError, "targets"),
    (dict(targets=torch.zeros(5)), TypeError, "targets"),
    (dict(self_cols=torch.full((5,), -1)), ValueError, "self_cols"),
    (dict(y=torch.randn(7, 4)), ValueError, "x and y"),
    (dict(y=torch.randn(2, 7, 3, dtype=torch.float64)), ValueError, "x and y"),
    (dict(x=torch.randn(2, 5, 4, dtype=torch.float64).long()), TypeError, "x"),
    (dict(backend="gpu"), ValueError, "backend"),
])
def test_bad_input(kwargs, exc, word):
    args = dict(x=torch.randn(2, 5, 4, dtype=torch.float64), y=torch.randn(2, 7, 4, dtype=torch.float64),
                targets=torch.arange(5), k=2, self_cols=torch.arange(1, 6), backend="torch")
    args.update(kwargs)
    with pytest.raises(exc, match=word):
        compute_topk(args.pop("x"), args.pop("y"), args.pop("targets"), args.pop("k"), **args)


@pytest.mark.parametrize("chunk", [None, 5])
def test_indexed_dot_values_and_gradients(monkeypatch, chunk):
    """⟨a_i, b_{c_iq}⟩ with repeated columns (the index_add of ∂b accumulates them), in one chunk and in many."""
    if chunk is not None:
        monkeypatch.setattr(topk_mod, "_CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(6)
    a = torch.randn(2, 7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    cols = torch.randint(0, 9, (2, 7, 4), generator=g)
    want = torch.stack([torch.stack([torch.stack([a[h, i] @ b[h, cols[h, i, q]] for q in range(4)])
                                     for i in range(7)]) for h in range(2)])
    torch.testing.assert_close(topk_mod.indexed_dot(a, b, cols), want, rtol=1e-14, atol=1e-14)
    assert torch.autograd.gradcheck(lambda a, b: topk_mod.indexed_dot(a, b, cols), (a, b))
    square = cols % 7  # a against itself (SimCLR): one input, both gradient parts
    assert torch.autograd.gradcheck(lambda a: topk_mod.indexed_dot(a, a, square), (a,))
