"""Second-order gradients (a gradient of a gradient, as in gradient penalties or meta-learning).

The ``torch`` backend differentiates twice through plain autograd: it agrees with gradgradcheck in float64 and its
mixed second derivatives are the same in both orders. The fused backends' backward kernels have no derivative:
differentiating one of their gradients raises a RuntimeError that names the backend and points to
backend="torch" (mmts_kernels/first_order.py), in every order (x then y, y then x, a learnable τ or margin), while
their first-order gradients, with or without ``create_graph=True``, stay exact.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

import mmts_kernels as mk
from support import backend_marker, test_device as device_for

F64 = torch.float64


def _inputs(N: int, M: int, D: int, seed: int, device="cpu", dtype=F64):
    """Random x [N, D], y [M, D] and per-sample τ, margins [N] in (0.1, 0.6], all requiring grad."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=dtype)
    y = torch.randn(M, D, generator=g, dtype=dtype)
    tau = 0.1 + 0.5 * torch.rand(N, generator=g, dtype=dtype)
    margin = 0.1 + 0.5 * torch.rand(N, generator=g, dtype=dtype)
    return [t.to(device).requires_grad_() for t in (x, y, tau, margin)]


def _loss(backend: str, kind: str, x, y, tau, margin):
    """One loss of each family whose second derivative is smooth enough for finite differences (InfoNCE), or
    needed for the margin order (max-margin)."""
    N, M = x.shape[0], y.shape[0]
    if kind == "symmetric":
        return mk.info_nce(x, y, temperature=tau, backend=backend)
    if kind == "one_directional":  # N != M: each row's positive picked by targets
        targets = torch.arange(N, device=x.device) % M
        return mk.info_nce(x, y, temperature=tau, symmetric=False, targets=targets, backend=backend)
    if kind == "max_margin":
        return mk.max_margin(x, y, margin=margin, backend=backend)
    raise AssertionError(kind)


# ---------------------------------------------------------------------------------------------------------------
# torch: exact second-order gradients

@given(N=st.integers(2, 5), extra_m=st.integers(0, 3), D=st.integers(1, 3), seed=st.integers(0, 2**16),
       kind=st.sampled_from(["symmetric", "one_directional"]))
def test_torch_backend_passes_gradgradcheck(N, extra_m, D, seed, kind):
    M = N if kind == "symmetric" else N + extra_m
    x, y, tau, _ = _inputs(N, M, D, seed)
    # fast_mode: checks random projections of the second derivatives rather than every entry (same tolerance)
    assert torch.autograd.gradgradcheck(lambda a, b, t: _loss("torch", kind, a, b, t, None), (x, y, tau),
                                        fast_mode=True)


@given(N=st.integers(2, 7), D=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_torch_backend_mixed_second_derivatives_agree_in_both_orders(N, D, seed):
    """⟨w, ∂/∂y ⟨∂L/∂x, v⟩⟩ = ⟨v, ∂/∂x ⟨∂L/∂y, w⟩⟩ (x then y against y then x), and likewise for (x, τ)."""
    x, y, tau, _ = _inputs(N, N, D, seed)
    g = torch.Generator().manual_seed(seed + 1)
    v, w, u = torch.randn(N, D, generator=g, dtype=F64), torch.randn(N, D, generator=g, dtype=F64), \
        torch.randn(N, generator=g, dtype=F64)

    def mixed(first, second, probe_first, probe_second):
        loss = _loss("torch", "symmetric", x, y, tau, None)
        grad, = torch.autograd.grad(loss, first, create_graph=True)
        hvp, = torch.autograd.grad((grad * probe_first).sum(), second)
        return (hvp * probe_second).sum()

    torch.testing.assert_close(mixed(x, y, v, w), mixed(y, x, w, v), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mixed(x, tau, v, u), mixed(tau, x, u, v), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# cpp and triton: a clear error, never a silent zero

FUSED = [pytest.param("cpp", marks=backend_marker("cpp")), pytest.param("triton", marks=backend_marker("triton"))]
# (loss, first differentiation, second differentiation)
ORDERS = [("symmetric", "x", "y"), ("symmetric", "y", "x"), ("symmetric", "x", "x"), ("symmetric", "tau", "tau"),
          ("symmetric", "x", "tau"), ("symmetric", "tau", "x"), ("one_directional", "y", "x"),
          ("max_margin", "margin", "x"), ("max_margin", "x", "margin")]


def _expected_error(backend: str) -> str:
    return rf"double backward .* not supported by the {backend} backend.*use backend=\"torch\""


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind,first,second", ORDERS)
def test_fused_backends_refuse_double_backward(backend, kind, first, second):
    device = device_for(backend)
    N, M = 5, (7 if kind == "one_directional" else 5)
    leaves = dict(zip(("x", "y", "tau", "margin"), _inputs(N, M, 3, seed=11, device=device, dtype=torch.float32)))
    loss = _loss(backend, kind, **leaves)
    grad, = torch.autograd.grad(loss, leaves[first], create_graph=True)
    with pytest.raises(RuntimeError, match=_expected_error(backend)):
        torch.autograd.grad(grad.sum(), leaves[second], allow_unused=True)


@pytest.mark.parametrize("backend", FUSED)
def test_fused_first_order_gradients_are_unchanged_by_create_graph(backend):
    """create_graph=True alone (nothing differentiates the result) gives the same gradients as a plain backward."""
    device = device_for(backend)
    leaves = _inputs(6, 6, 4, seed=5, device=device, dtype=torch.float32)
    x, y, tau, _ = leaves
    plain = torch.autograd.grad(_loss(backend, "symmetric", x, y, tau, None), (x, y, tau))
    graphed = torch.autograd.grad(_loss(backend, "symmetric", x, y, tau, None), (x, y, tau), create_graph=True)
    for a, b in zip(plain, graphed):
        assert torch.equal(a, b.detach())
