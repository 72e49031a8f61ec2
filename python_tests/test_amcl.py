"""AMCL (DESIGN §5, §10).

The published loss (the defaults: SimCLR form, top-k hardest negatives) and its MoCo form against float64 formulas
written from the math — values and every gradient (z1, z2, φ's parameters) on torch, cpp and triton, hypothesis
choosing B, D (incl. 1: ties), H and k (incl. k > 2B − 2); then the cross-modal form (the earlier default, behind
form="cross_modal") against a materialized formulation, gradcheck, φ learning, O(N) use of φ, bad inputs, and no
N×M allocation on the fused backends. The MoCo queue recipe for ``info_nce`` and ``FeatureQueue`` close the file."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch import nn
from torch.func import functional_call

import mmts_kernels as mk
from mmts_kernels.amcl import AMCLLoss, AMCLTemperatureNet, amcl_loss, omega
from support import AllocationRecorder, backend_marker, test_device as device_for

ALL_BACKENDS = [pytest.param(b, marks=backend_marker(b)) for b in ("torch", "cpp", "triton")]


# ---------------------------------------------------------------------------------------------------------------
# The published forms, from the formula: per anchor a with positive p and its k hardest negatives n_q,
#   L_a = −s⁺/τ⁺ + mean_q s_q/τ_q + β((d/2) log τ⁺ + 1/τ⁺) − β Σ_q (log τ_q + 1/τ_q),
#   τ(a, b) = τ_min + (τ_max − τ_min) σ(−⟨φ(z_a), φ(z_b)⟩), features L2-normalized, hardest = largest s, ties to the
#   lowest column; SimCLR: 2B anchors of cat(z1, z2), p(a) = a ± B, head loss ½(mean view 1 + mean view 2);
#   MoCo: B queries against cat(keys, queue), p(i) = i, mean over B. Heads summed.

def formula_anchor_loss(Z_a, Z_cols, phi_a, phi_cols, p, banned, k, beta, tau_min, tau_max):
    """One anchor: Z_a [D], Z_cols [M, D] (its positive at p; ``banned`` columns are not negatives)."""
    d = Z_a.shape[0]
    s = Z_cols @ Z_a  # [M]
    values = s.detach().tolist()
    negatives = sorted((j for j in range(len(values)) if j not in banned), key=lambda j: (-values[j], j))[:k]

    def tau(j):
        return tau_min + (tau_max - tau_min) * torch.sigmoid(-(phi_a * phi_cols[j]).sum())

    tp = tau(p)
    loss = -s[p] / tp + beta * (d / 2 * torch.log(tp) + 1 / tp)
    tn = {j: tau(j) for j in negatives}
    loss = loss + sum(s[j] / tn[j] for j in negatives) / len(negatives)
    for j in negatives:
        loss = loss - beta * (torch.log(tn[j]) + 1 / tn[j])
    return loss


def formula_simclr(z1, z2, net, k=100, beta=1e-4, tau_min=1e-5, tau_max=2.0):
    """[H, 2, B] per-anchor terms and the loss."""
    H, B, _ = z1.shape
    heads = []
    for h in range(H):
        Z = F.normalize(torch.cat([z1[h], z2[h]]), dim=1)
        phi = net(Z)
        terms = [formula_anchor_loss(Z[a], Z, phi[a], phi, (a + B) % (2 * B), {a, (a + B) % (2 * B)}, k, beta,
                                     tau_min, tau_max) for a in range(2 * B)]
        heads.append(torch.stack(terms).view(2, B))
    terms = torch.stack(heads)
    return terms, sum(0.5 * (t[0].mean() + t[1].mean()) for t in terms)


def formula_moco(q, keys, queue, net, k=100, beta=1e-4, tau_min=1e-5, tau_max=2.0):
    H, B, _ = q.shape
    heads = []
    for h in range(H):
        Q = F.normalize(q[h], dim=1)
        Y = F.normalize(torch.cat([keys[h], queue[h]]), dim=1)
        phi_q, phi_y = net(Q), net(Y)
        heads.append(torch.stack([formula_anchor_loss(Q[i], Y, phi_q[i], phi_y, i, {i}, k, beta, tau_min, tau_max)
                                  for i in range(B)]))
    terms = torch.stack(heads)
    return terms, terms.mean(1).sum()


def assert_close_rel(got, want, name, tol=1e-9):
    got, want = got.detach().cpu(), want.detach()
    assert got.shape == want.shape, name
    err = float((got - want).norm())
    assert err <= tol * float(want.norm()) + 1e-13, f"{name}: |Δ| = {err:.3g}, |want| = {float(want.norm()):.3g}"


def views(H, B, D, seed, heads=True, K=0):
    g = torch.Generator().manual_seed(seed)
    z1, z2, queue = (torch.randn(H, n, D, generator=g, dtype=torch.float64) for n in (B, B, K))
    torch.manual_seed(seed)
    net = AMCLTemperatureNet(D, hidden=6).double()
    return z1, z2, queue, net


def compare_backend(backend, loss_fn, inputs, net, want_terms, want_loss):
    """loss_fn(*inputs_on_device, net_on_device) → (terms, loss) on ``backend``; values and every gradient."""
    dev = device_for(backend)
    params = list(net.parameters())
    want_grads = torch.autograd.grad(want_loss, [*inputs, *params])
    net_dev = net.to(dev)
    leaves = [t.detach().to(dev).requires_grad_() for t in inputs]
    terms, loss = loss_fn(*leaves, net_dev, backend)
    assert_close_rel(terms, want_terms, "terms")
    assert_close_rel(loss, want_loss, "loss")
    got_grads = torch.autograd.grad(loss, [*leaves, *net_dev.parameters()])
    names = [f"input{i}" for i in range(len(inputs))] + [n for n, _ in net.named_parameters()]
    for name, a, b in zip(names, got_grads, want_grads):
        assert_close_rel(a, b, name)
    net.cpu()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@given(H=st.integers(1, 2), B=st.integers(2, 9), D=st.sampled_from([1, 2, 3, 5]), k=st.integers(1, 20),
       heads=st.booleans(), seed=st.integers(0, 2**16))
def test_simclr_form_matches_the_formula(backend, H, B, D, k, heads, seed):
    """The default form; k > 2B − 2 uses all 2B − 2 negatives; D = 1 makes every s = ±1 (ties: lowest column)."""
    H = H if heads else 1
    z1, z2, _, net = views(H, B, D, seed)
    z1.requires_grad_(), z2.requires_grad_()
    want_terms, want_loss = formula_simclr(z1, z2, net, k=k)

    def run(a, b, net, backend):
        kw = dict(topk=k, backend=backend)
        if not heads:
            a, b = a[0], b[0]
        terms = amcl_loss(a, b, net, reduction="none", **kw)
        terms = terms if heads else terms[None]
        if backend == "triton":  # the reductions run after the backend (checked on the others): one slow call
            return terms, terms.mean((1, 2)).sum()
        return terms, amcl_loss(a, b, net, **kw)

    compare_backend(backend, run, [z1, z2], net, want_terms, want_loss)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@given(H=st.integers(1, 2), B=st.integers(2, 7), K=st.integers(0, 9), D=st.sampled_from([1, 3, 4]),
       k=st.integers(1, 20), shared_queue=st.booleans(), seed=st.integers(0, 2**16))
def test_moco_form_matches_the_formula(backend, H, B, K, D, k, shared_queue, seed):
    """Queries against cat(keys, queue): the k hardest of the B − 1 other keys and the K queued rows."""
    q, keys, queue, net = views(H, B, D, seed, K=K)
    if shared_queue:  # one [K, D] queue for every head
        queue = queue[:1].expand(H, K, D).contiguous()
    q.requires_grad_(), keys.requires_grad_()
    want_terms, want_loss = formula_moco(q, keys, queue, net, k=k)

    def run(a, b, net, backend):
        qu = queue.to(a.device)[0] if shared_queue else queue.to(a.device)
        kw = dict(topk=k, backend=backend, queue=qu)
        terms = amcl_loss(a, b, net, reduction="none", **kw)
        if backend == "triton":  # as in the SimCLR test: one interpreter call
            return terms, terms.mean(1).sum()
        return terms, amcl_loss(a, b, net, **kw)

    compare_backend(backend, run, [q, keys], net, want_terms, want_loss)


def test_defaults_are_the_published_loss():
    """One call with defaults: φ = Linear(d, 128) → ReLU → Linear(128, d), k = 100, β = 1e-4, τ ∈ (1e-5, 2),
    normalized features, ½(both directions) per head, heads summed — with more than 100 negatives per anchor."""
    H, B, D = 2, 53, 8  # 104 negatives per anchor
    z1, z2, _, _ = views(H, B, D, seed=11)
    torch.manual_seed(0)
    net = AMCLTemperatureNet(D).double()
    assert [m.weight.shape for m in net.net if isinstance(m, nn.Linear)] == [(128, D), (D, 128)]
    out = amcl_loss(z1, z2, net, backend="torch")
    _, want = formula_simclr(z1, z2, net, k=100)
    assert_close_rel(out, want, "loss", tol=1e-12)
    module = AMCLLoss(D).double()
    module.temperature_net.load_state_dict(net.state_dict())
    assert_close_rel(module(z1, z2), want, "module", tol=1e-12)


def test_simclr_reductions_and_scale_invariance():
    z1, z2, _, net = views(2, 5, 3, seed=12)
    terms = amcl_loss(z1, z2, net, reduction="none", backend="torch")
    assert terms.shape == (2, 2, 5)
    torch.testing.assert_close(amcl_loss(z1, z2, net, reduction="sum", backend="torch"), terms.sum())
    torch.testing.assert_close(amcl_loss(z1, z2, net, backend="torch"), terms.mean((1, 2)).sum())
    # normalized features: scaling a view changes nothing; normalize=False does see it
    torch.testing.assert_close(amcl_loss(3 * z1, z2, net, backend="torch"), amcl_loss(z1, z2, net, backend="torch"))
    assert not torch.allclose(amcl_loss(3 * z1, z2, net, normalize=False, backend="torch"),
                              amcl_loss(z1, z2, net, normalize=False, backend="torch"))


def test_simclr_trains_phi_and_the_encoder():
    """Gradients reach every φ parameter and the encoder through both s and τ; a few Adam steps lower the loss."""
    torch.manual_seed(0)
    H, B, D = 3, 24, 16
    towers = nn.ModuleList([nn.Linear(8, D) for _ in range(H)])
    criterion = AMCLLoss(D, topk=10)
    feats = torch.randn(B, 8)
    opt = torch.optim.Adam([*towers.parameters(), *criterion.parameters()], lr=1e-2)
    history = []
    for _ in range(10):
        z1 = torch.stack([t(feats) for t in towers])
        z2 = torch.stack([t(feats + 0.1 * torch.randn(B, 8)) for t in towers])
        loss = criterion(z1, z2)
        opt.zero_grad()
        loss.backward()
        for name, p in [*criterion.named_parameters(), *towers.named_parameters()]:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        opt.step()
        history.append(loss.item())
    assert history[-1] < history[0]


@pytest.mark.parametrize("backend", [pytest.param(b, marks=backend_marker(b)) for b in ("cpp", "triton")])
@pytest.mark.parametrize("form", ["simclr", "moco"])
def test_published_forms_allocate_nothing_n_by_m(backend, form):
    """The fused backends: the largest tensor is O(N·k·D) (the gathered negatives), never the N×N scores."""
    dev = device_for(backend)
    B, D, k = (256, 4, 4) if backend == "cpp" else (40, 2, 3)
    g = torch.Generator().manual_seed(8)
    z1, z2 = (torch.randn(B, D, generator=g).to(dev).requires_grad_() for _ in range(2))
    queue = torch.randn(B, D, generator=g).to(dev) if form == "moco" else None
    net = AMCLTemperatureNet(D, hidden=4).to(dev)
    N = 2 * B
    with AllocationRecorder() as rec:
        amcl_loss(z1, z2, net, topk=k, queue=queue, backend=backend).backward()
    op, numel = rec.largest()
    assert numel <= N * k * D, f"{op} allocated {numel} elements (N·N = {N * N})"
    with AllocationRecorder() as rec:
        amcl_loss(z1.cpu(), z2.cpu(), net.cpu(), topk=k, queue=None if queue is None else queue.cpu(),
                  backend="torch")
    assert rec.largest()[1] >= B * B


@pytest.mark.parametrize("backend", [pytest.param(b, marks=backend_marker(b)) for b in ("torch", "cpp")])
def test_published_form_under_torch_compile(backend):
    """fullgraph through AOTAutograd: the top-k op (indices, a fake kernel) and the gathers trace without a break."""
    torch._dynamo.reset()
    z1, z2, _, net = views(2, 6, 4, seed=14)
    z1.requires_grad_()
    crit = AMCLLoss(temperature_net=net, topk=7, backend=backend)
    compiled = torch.compile(crit, fullgraph=True, backend="aot_eager")
    out, want = compiled(z1, z2), crit(z1, z2)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(out, z1)[0], torch.autograd.grad(want, z1)[0],
                               rtol=1e-12, atol=1e-12)


def test_backward_keeps_nothing_of_size_n_k_d():
    """The values at the top-k columns are recomputed in the backward (topk.indexed_dot): the tensors autograd saves
    are O(N·(D + k + hidden)), not the N·k·D gathered rows."""
    B, D, k = 64, 16, 32
    z1, z2, _, _ = views(1, B, D, seed=15)
    net = AMCLTemperatureNet(D).double()
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        amcl_loss(z1.requires_grad_(), z2, net, topk=k, backend="torch")
    N = 2 * B
    assert max(sizes) < N * k * D // 2, max(sizes)


def test_low_precision_inputs_give_fp32_loss_published():
    z1, z2, _, _ = views(2, 6, 4, seed=13)
    net = AMCLTemperatureNet(4, hidden=8)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        out = amcl_loss(z1.to(dtype), z2.to(dtype), net, topk=5)
        assert out.dtype == torch.float32 and torch.isfinite(out)


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(topk=0), ValueError, "topk"),
    (dict(topk=-1), ValueError, "topk"),
    (dict(topk=2.5), TypeError, "topk"),
    (dict(z2=torch.randn(2, 5, 4)), ValueError, "z2"),
    (dict(z2=torch.randn(6, 4)), ValueError, "z2"),
    (dict(z1=torch.randn(2, 1, 4), z2=torch.randn(2, 1, 4)), ValueError, "z1"),
    (dict(z1=torch.randn(1, 4), z2=torch.randn(1, 4)), ValueError, "z1"),
    (dict(z2=torch.randn(2, 6, 4, dtype=torch.float64)), TypeError, "z2"),
    (dict(z1=[1.0]), TypeError, "z1"),
    (dict(form="supcon"), ValueError, "form"),
    (dict(form="moco"), ValueError, "queue"),
    (dict(queue=torch.randn(5, 3)), ValueError, "queue"),
    (dict(queue=torch.randn(3, 5, 4)), ValueError, "queue"),
    (dict(queue=torch.randn(5, 4, dtype=torch.float64)), TypeError, "queue"),
    (dict(queue=torch.randn(5, 4), form="simclr"), ValueError, "queue"),
    (dict(targets=torch.arange(6)), ValueError, "targets"),
    (dict(symmetric=True), ValueError, "symmetric"),
    (dict(form="cross_modal", topk=5), ValueError, "topk"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(normalize=1), TypeError, "normalize"),
    (dict(tau_min=0.0), ValueError, "tau_min"),
    (dict(beta=-1.0), ValueError, "beta"),
    (dict(temperature_net=lambda z: z), TypeError, "temperature_net"),
    (dict(z1=torch.full((2, 6, 4), float("nan")), check_finite=True), ValueError, "z1"),
])
def test_bad_arguments_published_forms(kwargs, exc, word):
    args = dict(z1=torch.randn(2, 6, 4), z2=torch.randn(2, 6, 4), temperature_net=AMCLTemperatureNet(4, hidden=4))
    args.update(kwargs)
    with pytest.raises(exc, match=word):
        amcl_loss(args.pop("z1"), args.pop("z2"), args.pop("temperature_net"), **args)


# ---------------------------------------------------------------------------------------------------------------
# The cross-modal form (form="cross_modal", the earlier default): single hardest negative of x against y.


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
def test_cross_modal_matches_materialized_formulation(symmetric, reduction):
    x, y, net = make(seed=1)
    out = amcl_loss(x, y, net, form="cross_modal", symmetric=symmetric, reduction=reduction, backend="torch")
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
    out = amcl_loss(x[0], y[0], net, form="cross_modal", targets=targets, reduction="none", backend="torch")
    assert out.shape == (5,)
    torch.testing.assert_close(out, materialized_amcl(x, y, net, targets=targets, reduction="none")[0],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("symmetric", [False, True])
def test_gradcheck_through_inputs_and_temperature_net(symmetric):
    x, y, _ = make(H=2, N=5, D=3, seed=3)
    module = AMCLLoss(3, hidden=6, out_dim=4, form="cross_modal", symmetric=symmetric, reduction="none",
                      backend="torch").double()
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


def test_cross_modal_training_updates_the_temperature_network():
    """A few optimizer steps: finite, non-zero gradients reach every parameter of φ, and the loss goes down."""
    torch.manual_seed(0)
    H, N, D = 3, 32, 16
    towers = nn.ModuleList([nn.Linear(8, D) for _ in range(H)])
    criterion = AMCLLoss(D, hidden=32, out_dim=16, form="cross_modal", symmetric=True)
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


@pytest.mark.parametrize("form,symmetric", [("cross_modal", False), ("cross_modal", True), ("simclr", None),
                                            ("moco", None)])
def test_phi_runs_on_o_of_n_rows(form, symmetric):
    """φ sees each row once per head — H·(N + M) rows (SimCLR: the 2B rows of both views; MoCo: B queries, B keys
    and K queued rows), never the N·M pairs."""
    H, N, K, D = 2, 40, 7, 3
    net = CountingNet(D)
    queue = torch.randn(K, D) if form == "moco" else None
    amcl_loss(torch.randn(H, N, D), torch.randn(H, N, D), net, form=form, symmetric=symmetric, queue=queue,
              **({"topk": 5} if form != "cross_modal" else {}))
    assert net.rows == H * (2 * N + (K if form == "moco" else 0))


def test_low_precision_inputs_give_fp32_loss():
    x, y, _ = make(dtype=torch.float32)
    net = AMCLTemperatureNet(4, 8, 5)
    out = amcl_loss(x.detach().bfloat16(), y.detach().bfloat16(), net, form="cross_modal")
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
def test_bad_arguments_cross_modal(kwargs, exc, word):
    x, y, net = make(dtype=torch.float32)
    args = dict(x=x.detach(), y=y.detach(), temperature_net=net, form="cross_modal")
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
def test_cross_modal_fused_backends_match_the_reference(backend, symmetric, M):
    """float64, so hardest-negative columns agree exactly and values to rounding; gradients through x, y and φ."""
    x, y, net = make(H=2, N=7, M=M, D=5, seed=7)
    targets = None if symmetric else torch.randint(0, M, (7,), generator=torch.Generator().manual_seed(7))
    dev = device_for(backend)
    params = list(net.parameters())
    ref = amcl_loss(x, y, net, form="cross_modal", symmetric=symmetric, targets=targets, reduction="none",
                    backend="torch")
    want = torch.autograd.grad(ref.sum(), [x, y, *params])
    net_dev = net.to(dev)
    xd, yd = x.detach().to(dev).requires_grad_(), y.detach().to(dev).requires_grad_()
    out = amcl_loss(xd, yd, net_dev, form="cross_modal", symmetric=symmetric, reduction="none", backend=backend,
                    targets=None if targets is None else targets.to(dev))
    got = torch.autograd.grad(out.sum(), [xd, yd, *net_dev.parameters()])
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-10, atol=1e-12)
    for name, a, b in zip(["x", "y"] + [n for n, _ in net.named_parameters()], got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("backend", FUSED)
def test_cross_modal_fused_backends_allocate_nothing_n_by_m(backend):
    """Forward and backward on the fused statistics: no tensor of N·M elements (the reference does make one)."""
    dev = device_for(backend)
    N, D = (256, 8) if backend == "cpp" else (64, 3)  # the triton interpreter is slow; N·M still ≫ (N+M)·D
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, N, D, generator=g).to(dev).requires_grad_()
    y = torch.randn(2, N, D, generator=g).to(dev).requires_grad_()
    net = AMCLTemperatureNet(D, hidden=4, out_dim=3).to(dev)  # φ's own activations: H·N·4 elements
    for symmetric in (False, True):
        with AllocationRecorder() as rec:
            amcl_loss(x, y, net, form="cross_modal", symmetric=symmetric, backend=backend).backward()
        op, numel = rec.largest()
        assert numel < N * N // 4, f"{op} allocated {numel} elements (N·M = {N * N})"
    with AllocationRecorder() as rec:  # the recorder does see an N×M tensor when one is made
        amcl_loss(x.cpu(), y.cpu(), net.cpu(), form="cross_modal", backend="torch")
    assert rec.largest()[1] >= N * N


# ---------------------------------------------------------------------------------------------------------------
# Queue negatives (MoCo-style): the info_nce recipe against its formula, and FeatureQueue.

def formula_info_nce_queue(q, keys, queue, tau):
    """mean_i −log( e^{q_i·k_i/τ_i} / (Σ_j e^{q_i·k_j/τ_i} + Σ_m e^{q_i·Q_m/τ_i}) ), written out row by row."""
    losses = []
    for i in range(q.shape[0]):
        t = tau[i] if isinstance(tau, torch.Tensor) else tau
        logits = torch.cat([keys @ q[i], queue @ q[i]]) / t
        losses.append(-(logits[i] - torch.log(torch.exp(logits).sum())))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("per_sample", [False, True])
@given(B=st.integers(2, 9), K=st.integers(0, 12), D=st.sampled_from([1, 3, 6]), seed=st.integers(0, 2**16))
def test_info_nce_queue_recipe(backend, per_sample, B, K, D, seed):
    """y = cat(keys, queue), symmetric=False, targets=arange(B): values and gradients (q, keys, a learnable τ)."""
    g = torch.Generator().manual_seed(seed)
    q, keys, queue = (torch.randn(n, D, generator=g, dtype=torch.float64) for n in (B, B, K))
    tau = (0.05 + torch.rand(B, generator=g, dtype=torch.float64)) if per_sample else 0.2
    leaves = [q.requires_grad_(), keys.requires_grad_()] + ([tau.requires_grad_()] if per_sample else [])
    want = formula_info_nce_queue(q, keys, queue, tau)
    want_grads = torch.autograd.grad(want, leaves)
    dev = device_for(backend)
    got_leaves = [t.detach().to(dev).requires_grad_() for t in leaves]
    qd, kd = got_leaves[:2]
    td = got_leaves[2] if per_sample else tau
    got = mk.info_nce(qd, torch.cat([kd, queue.to(dev)]), temperature=td, symmetric=False,
                      targets=torch.arange(B, device=dev), backend=backend)
    assert_close_rel(got, want, "loss")
    for name, a, b in zip(["q", "keys", "tau"], torch.autograd.grad(got, got_leaves), want_grads):
        assert_close_rel(a, b, name)


def test_feature_queue_is_a_fifo_of_detached_rows():
    queue = mk.FeatureQueue(5, 2, dtype=torch.float64)
    assert len(queue) == 0 and queue.tensor.shape == (0, 2)
    rows = torch.arange(1, 15, dtype=torch.float64).view(7, 2).requires_grad_()
    queue.enqueue(rows[:3])
    assert torch.equal(queue.tensor, rows[:3].detach()) and not queue.tensor.requires_grad
    queue.enqueue(rows[3:7])  # 7 rows into 5 slots: rows 0 and 1 leave, first in first out
    assert len(queue) == 5
    assert sorted(map(tuple, queue.tensor.tolist())) == sorted(map(tuple, rows[2:7].tolist()))
    queue.enqueue(rows[:1] * 100)  # replaces the oldest, row 2
    assert sorted(map(tuple, queue.tensor.tolist())) == sorted(map(tuple, [*rows[3:7].tolist(), [100.0, 200.0]]))
    big = torch.randn(12, 2, dtype=torch.float64)  # more than fits: the newest 5
    queue.enqueue(big)
    assert sorted(map(tuple, queue.tensor.tolist())) == sorted(map(tuple, big[-5:].tolist()))
    clone = mk.FeatureQueue(5, 2, dtype=torch.float64)
    clone.load_state_dict(queue.state_dict())
    assert torch.equal(clone.tensor, queue.tensor)
    clone.enqueue(torch.zeros(1, 2, dtype=torch.float64) + 7)
    assert not torch.equal(clone.tensor, queue.tensor)


def test_feature_queue_with_heads_feeds_amcl_moco():
    """A MoCo-form training step with a [H, K, D] queue: φ gets gradients, the queue fills with detached keys."""
    torch.manual_seed(0)
    H, B, D = 2, 6, 4
    queue = mk.FeatureQueue(8, D, heads=H)
    criterion = AMCLLoss(D, hidden=8, topk=5)
    for step in range(3):
        q, keys = torch.randn(H, B, D, requires_grad=True), torch.randn(H, B, D, requires_grad=True)
        loss = criterion(q, keys, queue=queue.tensor)
        loss.backward()
        assert torch.isfinite(loss) and all(p.grad is not None for p in criterion.parameters())
        queue.enqueue(keys)
        assert queue.tensor.shape == (H, min(8, B * (step + 1)), D) and not queue.tensor.requires_grad


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(size=0), ValueError, "size"),
    (dict(dim=-1), ValueError, "dim"),
    (dict(heads=0), ValueError, "heads"),
    (dict(dtype=torch.int64), TypeError, "dtype"),
])
def test_feature_queue_bad_arguments(kwargs, exc, word):
    args = dict(size=4, dim=3)
    args.update(kwargs)
    with pytest.raises(exc, match=word):
        mk.FeatureQueue(**args)


def test_feature_queue_bad_keys():
    with pytest.raises(ValueError, match="keys"):
        mk.FeatureQueue(4, 3).enqueue(torch.randn(2, 4))
    with pytest.raises(ValueError, match="keys"):
        mk.FeatureQueue(4, 3, heads=2).enqueue(torch.randn(3, 2, 3))
    with pytest.raises(TypeError, match="keys"):
        mk.FeatureQueue(4, 3).enqueue([[1.0, 2.0, 3.0]])
