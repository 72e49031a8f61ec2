"""AMCL (DESIGN §4, §5): the loss on the fused statistics against a materialized formulation, gradients by gradcheck
(float64, through x, y and φ's parameters), φ learns, O(N) use of φ, bad inputs, and the fused backends (cpp,
triton) against the reference with no N×M allocation."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from mmts_kernels.amcl import AMCLLoss, AMCLTemperatureNet, amcl_loss, omega
from support import AllocationRecorder, backend_marker, test_device as device_for


def materialized_amcl(x, y, net, *, symmetric=False, targets=None, beta=1e-4, tau_min=1e-5, tau_max=2.0,
                      reduction="mean"):
    """AMCL written out on the full S of every head: Python loops over anchors, φ on each pair separately."""
    H, N, D = x.shape
    M = y.shape[1]
    targets = torch.arange(N) if targets is None else targets

    def tau(a, b):
        return tau_min + (tau_max - tau_min) * torch.sigmoid(-(net(a) * net(b)).sum())

    def term(s_pos, s_neg, tp, tn):
        om = lambda t: D / 2 * torch.log(t) + 1 / t  # noqa: E731
        return -s_pos / tp + s_neg / tn + beta * om(tp) - beta * om(tn)

    heads = []
    for h in range(H):
        S = x[h] @ y[h].T
        rows, cols = [], []
        for i in range(N):
            t = int(targets[i])
            negs = [j for j in range(M) if j != t]
            j = max(negs, key=lambda c: (float(S[i, c].detach()), -c))  # hardest negative, lowest column on ties
            rows.append(term(S[i, t], S[i, j], tau(x[h, i], y[h, t]), tau(x[h, i], y[h, j])))
        if symmetric:
            for j in range(N):
                i = max([r for r in range(N) if r != j], key=lambda r: (float(S[r, j].detach()), -r))
                cols.append(term(S[j, j], S[i, j], tau(x[h, j], y[h, j]), tau(x[h, i], y[h, j])))
        terms = torch.stack((torch.stack(rows), torch.stack(cols))) if symmetric else torch.stack(rows)
        heads.append(terms)
    terms = torch.stack(heads)
    if reduction == "none":
        return terms
    per_head = terms.flatten(1).sum(1)
    return (per_head / terms[0].numel() if reduction == "mean" else per_head).sum()


def make(H=2, N=6, M=None, D=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    M = N if M is None else M
    x = torch.randn(H, N, D, generator=g, dtype=dtype).requires_grad_()
    y = torch.randn(H, M, D, generator=g, dtype=dtype).requires_grad_()
    torch.manual_seed(seed)
    net = AMCLTemperatureNet(D, hidden=8, out_dim=5).to(dtype)
    return x, y, net


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_materialized_formulation(symmetric, reduction):
    x, y, net = make(seed=1)
    out = amcl_loss(x, y, net, symmetric=symmetric, reduction=reduction, backend="torch")
    ref = materialized_amcl(x, y, net, symmetric=symmetric, reduction=reduction)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    names = [n for n, _ in net.named_parameters()]
    got = torch.autograd.grad(out.sum(), [x, y, *net.parameters()])
    want = torch.autograd.grad(ref.sum(), [x, y, *net.parameters()])
    for name, a, b in zip(["x", "y", *names], got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_rectangular_targets_and_no_head_axis():
    x, y, net = make(H=1, N=5, M=7, seed=2)
    targets = torch.tensor([6, 0, 3, 3, 1])
    out = amcl_loss(x[0], y[0], net, targets=targets, reduction="none", backend="torch")
    assert out.shape == (5,)
    torch.testing.assert_close(out, materialized_amcl(x, y, net, targets=targets, reduction="none")[0],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("symmetric", [False, True])
def test_gradcheck_through_inputs_and_temperature_net(symmetric):
    x, y, _ = make(H=2, N=5, D=3, seed=3)
    module = AMCLLoss(3, hidden=6, out_dim=4, symmetric=symmetric, reduction="none", backend="torch").double()
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]

    def f(x, y, *ps):
        return functional_call(module, dict(zip(names, ps)), (x, y))

    assert torch.autograd.gradcheck(f, (x, y, *params))


def test_temperatures_lie_in_range_and_omega():
    _, _, net = make(D=4)
    a, b = torch.randn(100, 4, dtype=torch.float64) * 10, torch.randn(100, 4, dtype=torch.float64) * 10
    tau = net.temperature(a, b)
    assert ((tau >= 1e-5) & (tau <= 2.0)).all()
    t = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(omega(t, 4), 2 * torch.log(t) + 1 / t)


def test_training_updates_the_temperature_network():
    """A few optimizer steps: finite, non-zero gradients reach every parameter of φ, and the loss goes down."""
    torch.manual_seed(0)
    H, N, D = 3, 32, 16
    towers = nn.ModuleList([nn.Linear(8, D) for _ in range(H)])
    criterion = AMCLLoss(D, hidden=32, out_dim=16, symmetric=True)
    feats = torch.randn(N, 8)
    opt = torch.optim.Adam([*towers.parameters(), *criterion.parameters()], lr=1e-2)
    before = [p.detach().clone() for p in criterion.parameters()]
    losses = []
    for _ in range(10):
        z = torch.nn.functional.normalize(torch.stack([t(feats) for t in towers]), dim=-1)  # [H, N, D]
        w = torch.nn.functional.normalize(torch.stack([t(feats + 0.1 * torch.randn(N, 8)) for t in towers]), dim=-1)
        loss = criterion(z, w)
        opt.zero_grad()
        loss.backward()
        for name, p in criterion.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert all(not torch.equal(a, b) for a, b in zip(before, criterion.parameters()))


class CountingNet(nn.Module):
    def __init__(self, D):
        super().__init__()
        self.lin = nn.Linear(D, 3)
        self.rows = 0

    def forward(self, z):
        self.rows += z.shape[:-1].numel()
        return self.lin(z)


@pytest.mark.parametrize("symmetric", [False, True])
def test_phi_runs_on_o_of_n_rows(symmetric):
    """φ sees each anchor and each column once per head: H·(N + M) rows, never the N·M pairs."""
    H, N, D = 2, 40, 3
    net = CountingNet(D)
    amcl_loss(torch.randn(H, N, D), torch.randn(H, N, D), net, symmetric=symmetric)
    assert net.rows == H * 2 * N


def test_low_precision_inputs_give_fp32_loss():
    x, y, _ = make(dtype=torch.float32)
    net = AMCLTemperatureNet(4, 8, 5)
    out = amcl_loss(x.detach().bfloat16(), y.detach().bfloat16(), net)
    assert out.dtype == torch.float32 and torch.isfinite(out)


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(temperature_net=lambda z: z), TypeError, "temperature_net"),
    (dict(tau_min=0.0), ValueError, "tau_min"),
    (dict(tau_min=2.0, tau_max=1.0), ValueError, "tau_min"),
    (dict(tau_max=float("inf")), ValueError, "tau_max"),
    (dict(beta=-1.0), ValueError, "beta"),
    (dict(beta="1e-4"), TypeError, "beta"),
    (dict(omega_dim=0), ValueError, "omega_dim"),
    (dict(symmetric=True, targets=torch.arange(6)), ValueError, "targets"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(x=torch.randn(2, 6)), ValueError, "x"),
    (dict(y=torch.randn(2, 6, 5)), ValueError, "D"),
])
def test_bad_arguments(kwargs, exc, word):
    x, y, net = make(dtype=torch.float32)
    args = dict(x=x.detach(), y=y.detach(), temperature_net=net)
    args.update(kwargs)
    with pytest.raises(exc, match=word):
        amcl_loss(args.pop("x"), args.pop("y"), args.pop("temperature_net"), **args)


def test_module_needs_dim_or_net():
    with pytest.raises(ValueError, match="dim"):
        AMCLLoss()
    with pytest.raises(TypeError, match="temperature_net"):
        AMCLLoss(temperature_net=3)


# ---------------------------------------------------------------------------------------------------------------
# The fused backends: the same loss and gradients as the torch reference, and nothing N×M allocated.

FUSED = [pytest.param(b, marks=backend_marker(b)) for b in ("cpp", "triton")]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("symmetric,M", [(False, 9), (True, 7)])
def test_fused_backends_match_the_reference(backend, symmetric, M):
    """float64, so hardest-negative columns agree exactly and values to rounding; gradients through x, y and φ."""
    x, y, net = make(H=2, N=7, M=M, D=5, seed=7)
    targets = None if symmetric else torch.randint(0, M, (7,), generator=torch.Generator().manual_seed(7))
    dev = device_for(backend)
    params = list(net.parameters())
    ref = amcl_loss(x, y, net, symmetric=symmetric, targets=targets, reduction="none", backend="torch")
    want = torch.autograd.grad(ref.sum(), [x, y, *params])
    net_dev = net.to(dev)
    xd, yd = x.detach().to(dev).requires_grad_(), y.detach().to(dev).requires_grad_()
    out = amcl_loss(xd, yd, net_dev, symmetric=symmetric, reduction="none", backend=backend,
                    targets=None if targets is None else targets.to(dev))
    got = torch.autograd.grad(out.sum(), [xd, yd, *net_dev.parameters()])
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-10, atol=1e-12)
    for name, a, b in zip(["x", "y"] + [n for n, _ in net.named_parameters()], got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("backend", FUSED)
def test_fused_backends_allocate_nothing_n_by_m(backend):
    """Forward and backward on the fused statistics: no tensor of N·M elements (the reference does make one)."""
    dev = device_for(backend)
    N, D = (256, 8) if backend == "cpp" else (64, 3)  # the triton interpreter is slow; N·M still ≫ (N+M)·D
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, N, D, generator=g).to(dev).requires_grad_()
    y = torch.randn(2, N, D, generator=g).to(dev).requires_grad_()
    net = AMCLTemperatureNet(D, hidden=4, out_dim=3).to(dev)  # φ's own activations: H·N·4 elements
    for symmetric in (False, True):
        with AllocationRecorder() as rec:
            amcl_loss(x, y, net, symmetric=symmetric, backend=backend).backward()
        op, numel = rec.largest()
        assert numel < N * N // 4, f"{op} allocated {numel} elements (N·M = {N * N})"
    with AllocationRecorder() as rec:  # the recorder does see an N×M tensor when one is made
        amcl_loss(x.cpu(), y.cpu(), net.cpu(), backend="torch")
    assert rec.largest()[1] >= N * N
