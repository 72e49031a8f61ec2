"""The cpp backend's sigmoid statistic and label masks (issue 18), and its one-gradient NT-Xent backward (issue 17).

What python_tests/test_sigmoid_labels_stats.py checks for every backend at the default tile shape, here across what
only the cpp kernel has: small tiles (edge tiles, many row chunks, masks cut by tile borders), thread counts that
pick each backward schedule (the buffer-free rounds, per-thread buffers, the Gram rounds), deterministic=True, the
fp32 kernels (AVX2 and portable), the op's registration (opcheck, torch.compile), and NT-Xent's memory: x is y
gives the op no y and the backward one N×D gradient.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mmts_kernels as mk
from mmts_kernels import reference
from mmts_kernels.stats import StatsRequest
from support import AllocationRecorder, backend_marker, rel_err, run_python, targets_and_labels
from test_cpp import peak_rss_growth

pytestmark = backend_marker("cpp")

KINDS = ("sigmoid", "sigmoid_ring", "sigmoid_positive", "sigmoid_mask", "sigmoid_self", "lse_mask",
         "hinge_hard_mask", "ntxent_mask")
NO_GRAD_FIELDS = ("cnt", "arg", "cnt_c", "arg_c", "ws", "ws_c")


def make_case(kind: str, H: int, N: int, M: int, D: int, classes: int, seed: int, dtype=torch.float64):
    """(x, y, tau, margin, targets, request, kwargs, leaves) for compute_stats: unit rows, τ ∈ [0.2, 1.2] (the
    fp32 tests' 1e-5 with the lse's 1/τ), biases in [−4, 2], ``classes`` labels (one big class to singletons)."""
    g = torch.Generator().manual_seed(seed)
    square = kind in ("sigmoid_positive", "lse_mask", "hinge_hard_mask")
    same_tensor = kind in ("sigmoid_self", "ntxent_mask")  # Z against itself, as NT-Xent calls it
    if square or same_tensor:
        M = N
    unit = lambda t: torch.nn.functional.normalize(t, dim=-1).to(dtype)  # noqa: E731
    x = unit(torch.randn(H, N, D, generator=g, dtype=torch.float64)).requires_grad_()
    y = x if same_tensor else unit(torch.randn(H, M, D, generator=g, dtype=torch.float64)).requires_grad_()
    leaves = {"x": x} if same_tensor else {"x": x, "y": y}
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    tau = (0.2 + torch.rand(H, N, generator=g, dtype=torch.float64)).to(cdt).requires_grad_()
    bias = (torch.rand(H, N, generator=g, dtype=torch.float64) * 6 - 4).to(cdt).requires_grad_()
    margin = (0.05 + 0.4 * torch.rand(H, N, generator=g, dtype=torch.float64)).to(cdt).requires_grad_()
    layout = "views" if same_tensor else "square" if square else "rect"
    targets, self_cols, lx, ly = targets_and_labels(layout, N, M, classes, g, ring=kind == "sigmoid_ring")
    same_label = {"sigmoid_ring": "mask", "sigmoid_positive": "positive", "sigmoid_mask": "mask",
                  "lse_mask": "mask", "hinge_hard_mask": "mask", "ntxent_mask": "mask"}.get(kind)
    if kind.startswith("sigmoid"):
        request = StatsRequest(sigmoid=True, same_label=same_label)
        leaves.update(tau=tau, bias=bias)
    elif kind == "lse_mask":
        request = StatsRequest(lse=True, ws=True, cols=True, same_label=same_label)
        leaves.update(tau=tau)
    elif kind == "hinge_hard_mask":
        request = StatsRequest(hinge=True, hard=True, cols=True, same_label=same_label)
        leaves.update(margin=margin)
    else:
        request = StatsRequest(lse=True, ws=True, decoupled=seed % 2 == 0, same_label=same_label)
        leaves.update(tau=tau)
    kwargs = dict(self_cols=self_cols, bias=bias if request.sigmoid else None,
                  labels=(lx, ly) if same_label else None)
    return (x, y, tau if "tau" in leaves else None, margin if "margin" in leaves else None, targets, request,
            kwargs, leaves)


def stats_and_grads(impl, case, seed: int, **request_changes):
    """The requested fields and the gradients of a fixed random weighting of the differentiable ones."""
    x, y, tau, margin, targets, request, kwargs, leaves = case
    if request_changes:
        request = StatsRequest(**{**request.__dict__, **request_changes})
    stats = impl.compute_stats(x, y, tau, margin, targets, request, **kwargs)
    fields = {k: v for k, v in stats._asdict().items() if v is not None}
    g = torch.Generator().manual_seed(seed + 1)
    total = sum((torch.randn(v.shape, generator=g, dtype=torch.float64).to(v.dtype) * v).where(v.isfinite(), 0.0)
                .sum() for k, v in fields.items() if k not in NO_GRAD_FIELDS)
    grads = torch.autograd.grad(total, list(leaves.values()))
    return {k: v.detach() for k, v in fields.items()}, dict(zip(leaves, grads))


def assert_close(out, ref, tol: float):
    (out_f, out_g), (ref_f, ref_g) = out, ref
    for name, r in ref_f.items():
        if name in ("ws", "ws_c") and name not in out_f:
            continue
        o = out_f[name]
        if name in ("arg", "arg_c"):  # unspecified where the mask leaves no negative
            has = ref_f["hard" if name == "arg" else "hard_c"].isfinite()
            assert torch.equal(o[has], r[has]), name
        elif name in ("cnt", "cnt_c"):
            assert torch.equal(o, r), name
        elif name in ("hard", "hard_c"):
            assert torch.equal(o.isfinite(), r.isfinite()), name
            assert rel_err(o[r.isfinite()], r[r.isfinite()]) <= tol, name
        else:
            assert rel_err(o, r) <= tol, (name, rel_err(o, r))
    for name, r in ref_g.items():
        assert rel_err(out_g[name], r) <= tol, (name, rel_err(out_g[name], r))


def with_threads(n: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@given(kind=st.sampled_from(KINDS), H=st.integers(1, 2), N=st.integers(2, 45), M=st.integers(2, 41),
       D=st.integers(1, 9), classes=st.integers(1, 40), seed=st.integers(0, 2**16),
       tiles=st.sampled_from(("3x2", "5x7", "8x8")), threads=st.sampled_from((1, 2, 3)),
       deterministic=st.booleans())
def test_float64_tiles_threads_schedules(kind, H, N, M, D, classes, seed, tiles, threads, deterministic):
    """Values and every gradient to 1e-12 of the reference, for any tile shape, thread count and schedule."""
    from mmts_kernels import cpp_backend

    if kind in ("sigmoid_self", "ntxent_mask"):
        N = 2 * max(2, N // 2)
    case = make_case(kind, H, N, M, D, classes, seed)
    ref = stats_and_grads(reference, case, seed)
    os.environ["MMTS_KERNELS_CPP_BLOCK"] = tiles
    try:
        out = with_threads(threads, lambda: stats_and_grads(cpp_backend, case, seed, deterministic=deterministic))
    finally:
        del os.environ["MMTS_KERNELS_CPP_BLOCK"]
    assert_close(out, ref, 1e-12)


@pytest.mark.parametrize("kind", ("sigmoid", "sigmoid_mask", "lse_mask", "hinge_hard_mask"))
def test_deterministic_is_bitwise_for_any_thread_count(kind, monkeypatch):
    from mmts_kernels import cpp_backend

    monkeypatch.setenv("MMTS_KERNELS_CPP_BLOCK", "8x8")
    case = make_case(kind, 2, 61, 47, 5, 6, seed=4, dtype=torch.float32)
    runs = [with_threads(n, lambda: stats_and_grads(cpp_backend, case, 4, deterministic=True)) for n in (1, 2, 3)]
    for fields, grads in runs[1:]:
        assert all(torch.equal(fields[k], runs[0][0][k]) for k in fields)
        assert all(torch.equal(grads[k], runs[0][1][k]) for k in grads)


@pytest.mark.parametrize("tiles", ("8x16", "256x256"))
@pytest.mark.parametrize("kind", ("sigmoid", "sigmoid_positive", "sigmoid_ring"))
def test_float32_sigmoid(kind, tiles, monkeypatch):
    """fp32 (the AVX2 kernels here) to 1e-5 of float64 on the same inputs; large logits stay finite."""
    from mmts_kernels import cpp_backend

    monkeypatch.setenv("MMTS_KERNELS_CPP_BLOCK", tiles)
    case = make_case(kind, 1, 300, 290, 16, 30, seed=8, dtype=torch.float32)
    x, y, tau, margin, targets, request, kwargs, leaves = case
    ref_case = (x.double(), y.double(), tau.double(), None, targets, request,
                {**kwargs, "bias": kwargs["bias"].double()}, None)
    ref = reference.compute_stats(*ref_case[:6], **ref_case[6]).sig
    assert rel_err(cpp_backend.compute_stats(*case[:6], **kwargs).sig, ref) <= 1e-5
    sharp = cpp_backend.compute_stats(x, y, tau * 0 + 0.01, None, targets, request,
                                      **{**kwargs, "bias": kwargs["bias"] * 0 - 30}).sig  # |u| up to 130
    assert torch.isfinite(sharp).all()


def test_portable_kernels_sigmoid():
    """The baseline (non-AVX2) build of the sigmoid and mask kernels, forced for one process."""
    script = """
        import json, torch
        from mmts_kernels import cpp_backend, reference
        from support import rel_err
        from test_cpp_sigmoid import make_case, stats_and_grads
        assert cpp_backend.instruction_set() == "portable"
        errs = []
        for kind in ("sigmoid_positive", "sigmoid_ring", "lse_mask", "hinge_hard_mask"):
            case = make_case(kind, 1, 70, 50, 6, 5, seed=3, dtype=torch.float32)
            (out, _), (ref, _) = stats_and_grads(cpp_backend, case, 3), stats_and_grads(reference, case, 3)
            errs += [rel_err(out[k], ref[k]) for k in ("sig", "lse", "hinge", "lse_c") if k in ref]
        print(json.dumps(max(errs)))
    """
    out = run_python(script, MMTS_KERNELS_CPP_ISA="portable", MMTS_KERNELS_CPP_BLOCK="16x16")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# The op's registration

def _op_args(kind: str):
    x, y, tau, margin, targets, request, kwargs, _ = make_case(kind, 1, 6, 5, 3, 2, seed=5, dtype=torch.float32)
    lx, ly = kwargs["labels"] if kwargs["labels"] is not None else (None, None)
    same = {None: 0, "mask": 1, "positive": 2}[request.same_label]
    return (x, y, tau, margin, targets, request.lse, request.hinge, request.hard, request.ws, request.cols, False,
            0.0, 0.0, False, 4, 4, None, False, False, kwargs["bias"], lx, ly, request.sigmoid, same,
            request.sigmoid)


@pytest.mark.parametrize("kind", ("sigmoid_ring", "sigmoid_positive", "lse_mask", "hinge_hard_mask"))
def test_opcheck(kind):
    """Schema, fake kernel and autograd registration with the sigmoid and label arguments."""
    from mmts_kernels import cpp_backend  # noqa: F401  (registers the fake kernels and autograd)

    torch.library.opcheck(torch.ops.mmts_kernels.cpu_stats.default, _op_args(kind),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_sigmoid_and_labels():
    """fullgraph=True through the API, the op with its new arguments, its fake kernel and its autograd."""
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(40, 8, generator=g, requires_grad=True), torch.randn(40, 8, generator=g, requires_grad=True)
    tau = (0.1 + torch.rand(40, generator=g)).requires_grad_()
    bias = torch.full((40,), -2.0, requires_grad=True)
    labels = torch.randint(0, 6, (40,), generator=g)
    calls = [
        (lambda x, y, t, b: mk.sigmoid_loss(x, y, t, b, backend="cpp"), (x, y, tau, bias)),
        (lambda x, y, t, b: mk.sigmoid_loss(x, y, t, b, labels=labels, backend="cpp"), (x, y, tau, bias)),
        (lambda x, y, t: mk.info_nce(x, y, t, labels=labels, same_label="ignore", backend="cpp"), (x, y, tau)),
    ]
    for fn, args in calls:
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(*args)
        eager = fn(*args)
        assert torch.equal(compiled, eager)
        for a, b in zip(torch.autograd.grad(compiled, args), torch.autograd.grad(eager, args)):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# NT-Xent: one gradient for Z

def test_ntxent_backward_returns_one_gradient():
    """compute_stats(Z, Z) passes no y: the backward op returns dZ and an empty second gradient (no dy to add)."""
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(50, 8, generator=g, requires_grad=True), torch.randn(50, 8, generator=g, requires_grad=True)
    with AllocationRecorder() as rec:
        mk.nt_xent(z1, z2, 0.2, backend="cpp").backward()
    outs = [numel for name, numel in rec.numels if "cpu_stats_backward" in name]
    assert outs == [100 * 8, 0], outs


def test_ntxent_peak_memory():
    """Peak RSS growth of NT-Xent fwd+bwd at B = 2048, D = 256 (Z: 4 MiB, S: 64 MiB) in a fresh process, two
    threads: Z, dZ and the tile buffers, no second N×D gradient nor per-thread buffers."""
    growth = peak_rss_growth("""
        torch.set_num_threads(2)
        z1, z2 = torch.randn(2048, 256, requires_grad=True), torch.randn(2048, 256, requires_grad=True)
        mk.nt_xent(z1[:300], z2[:300], 0.1, backend="cpp").backward()   # load the library, warm up
        z1.grad, z2.grad = torch.zeros_like(z1), torch.zeros_like(z2)  # gradients are not extra memory
    """, """mk.nt_xent(z1, z2, 0.1, backend="cpp").backward()""")
    z_bytes = 4096 * 256 * 4
    assert growth <= 2 * z_bytes, f"peak RSS grew by {growth / 2**20:.1f} MiB"  # about 6 MiB measured


# ---------------------------------------------------------------------------------------------------------------
# The sigmoid fused with its gradient: the forward's Q·y and Qᵀ·x, scaled by a backward whose upstream gradient is
# uniform over the rows of a head, the tiles recomputed otherwise

SIGMOID_KINDS = tuple(k for k in KINDS if k.startswith("sigmoid"))


def sigmoid_grads(impl, case, seed: int, upstream: str, **request_changes):
    """sig and the gradients of Σ_h Σ_i w_hi sig_hi (+ Σ w'_hi pos_hi for "uniform_pos"), w uniform over the rows of
    each head ("uniform", "uniform_pos": the fast path), random ("random": the tiles), or uniform in head 0 only
    ("mixed": one head each way)."""
    x, y, tau, margin, targets, request, kwargs, leaves = case
    if request_changes:
        request = StatsRequest(**{**request.__dict__, **request_changes})
    stats = impl.compute_stats(x, y, tau, margin, targets, request, **kwargs)
    g = torch.Generator().manual_seed(seed + 2)
    H, N = stats.sig.shape
    w = torch.rand(H, N, generator=g, dtype=torch.float64) + 0.5
    if upstream in ("uniform", "uniform_pos"):
        w = w[:, :1].expand(H, N)
    elif upstream == "mixed":
        w = torch.cat((w[:1, :1].expand(1, N), w[1:]))
    total = (w.to(stats.sig.dtype) * stats.sig).sum()
    if upstream == "uniform_pos":  # the positive's gradient joins the scaled products outside the tiles
        total = total + (torch.randn(H, N, generator=g, dtype=torch.float64).to(stats.pos.dtype) * stats.pos).sum()
    grads = torch.autograd.grad(total, list(leaves.values()))
    return {"sig": stats.sig.detach()}, dict(zip(leaves, grads))


@given(kind=st.sampled_from(SIGMOID_KINDS), upstream=st.sampled_from(("uniform", "uniform_pos", "mixed", "random")),
       H=st.integers(1, 2), N=st.integers(2, 45), M=st.integers(2, 41), D=st.integers(1, 9),
       classes=st.integers(1, 40), seed=st.integers(0, 2**16), tiles=st.sampled_from(("3x2", "5x7", "8x8")),
       threads=st.sampled_from((1, 2, 3)), deterministic=st.booleans())
def test_fused_sigmoid_gradient_float64(kind, upstream, H, N, M, D, classes, seed, tiles, threads, deterministic):
    """Both backward paths of the fused sigmoid (uniform upstream: the forward's products scaled; otherwise: the
    tiles), per head, to 1e-12 of the reference in every gradient (x, y, τ, bias), any tiles, threads, schedule."""
    from mmts_kernels import cpp_backend

    if kind == "sigmoid_self":
        N = 2 * max(2, N // 2)
    case = make_case(kind, H, N, M, D, classes, seed)
    ref = sigmoid_grads(reference, case, seed, upstream)
    os.environ["MMTS_KERNELS_CPP_BLOCK"] = tiles
    try:
        out = with_threads(threads, lambda: sigmoid_grads(cpp_backend, case, seed, upstream,
                                                          deterministic=deterministic))
    finally:
        del os.environ["MMTS_KERNELS_CPP_BLOCK"]
    assert_close(out, ref, 1e-12)


def _backward_gemms(loss: torch.Tensor) -> int:
    """How many GEMMs (at::mm / addmm, inside the C++ kernels included) ``loss.backward()`` runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss.backward()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::addmm_"))


@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
def test_fused_sigmoid_backward_path(reduction, monkeypatch):
    """mean and sum: the backward only scales the forward's products (no GEMM) and they become the gradients
    themselves (no new N×D buffer); per-row weights (reduction="none"): the tiles are recomputed. Same gradients."""
    monkeypatch.setenv("MMTS_KERNELS_CPP_BLOCK", "16x16")
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(50, 6, generator=g, requires_grad=True), torch.randn(40, 6, generator=g, requires_grad=True)
    tau, bias = (0.1 + torch.rand(50, generator=g)).requires_grad_(), torch.full((50,), -2.0, requires_grad=True)
    weights = torch.rand(50, generator=g) + 0.5

    def loss(backend):
        value = mk.sigmoid_loss(x, y, tau, bias, targets=torch.arange(50) % 40, reduction=reduction, backend=backend)
        return (value * weights).sum() if reduction == "none" else value

    ref = torch.autograd.grad(loss("torch"), (x, y, tau, bias))
    gemms = _backward_gemms(loss("cpp"))
    assert (gemms == 0) == (reduction != "none"), gemms
    for leaf, r in zip((x, y, tau, bias), ref):
        assert rel_err(leaf.grad, r) <= 1e-5
    if reduction != "none":  # the forward's products became x.grad and y.grad: no copy
        with AllocationRecorder() as rec:
            x.grad = y.grad = None
            loss("cpp").backward()
        assert max(n for name, n in rec.numels if "cpu_stats_backward" in name) == 0, rec.numels


def test_fused_sigmoid_retained_graph():
    """A second backward through a retained graph (the products were spent by the first) recomputes the tiles and
    gives the same gradients; without x or y to differentiate the forward computes no products."""
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(30, 5, generator=g, requires_grad=True), torch.randn(20, 5, generator=g, requires_grad=True)
    loss = mk.sigmoid_loss(x, y, 0.3, -1.0, targets=torch.arange(30) % 20, backend="cpp")
    first = torch.autograd.grad(loss, (x, y), retain_graph=True)
    second = torch.autograd.grad(loss, (x, y))
    for a, b in zip(first, second):
        assert rel_err(a, b) <= 1e-6
    with AllocationRecorder() as rec:
        mk.sigmoid_loss(x.detach(), y.detach(), 0.3, -1.0, targets=torch.arange(30) % 20, backend="cpp")
    assert max(n for name, n in rec.numels if "cpu_stats" in name) == 30  # [N] statistics only


@pytest.mark.parametrize("sig_q", (1, 2, 3))
def test_opcheck_fused_sigmoid(sig_q):
    """The fused products' fake shapes and autograd registration (x only, y only, both)."""
    from mmts_kernels import cpp_backend  # noqa: F401  (registers the fake kernels and autograd)

    args = _op_args("sigmoid_ring") + (sig_q,)
    torch.library.opcheck(torch.ops.mmts_kernels.cpu_stats.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_fused_sigmoid_deterministic_is_bitwise_for_any_thread_count(monkeypatch):
    """The fused forward's schedule depends on the shapes only: sig and the scaled products are bitwise the same for
    1, 2 and 3 threads, deterministic=True or not."""
    from mmts_kernels import cpp_backend

    monkeypatch.setenv("MMTS_KERNELS_CPP_BLOCK", "8x8")
    case = make_case("sigmoid_mask", 2, 61, 47, 5, 6, seed=4, dtype=torch.float32)
    for deterministic in (False, True):
        runs = [with_threads(n, lambda: sigmoid_grads(cpp_backend, case, 4, "uniform", deterministic=deterministic))
                for n in (1, 2, 3)]
        for fields, grads in runs[1:]:
            assert torch.equal(fields["sig"], runs[0][0]["sig"])
            assert all(torch.equal(grads[k], runs[0][1][k]) for k in grads)


def test_fused_sigmoid_peak_memory():
    """Peak RSS growth of the sigmoid loss's fwd+bwd at N = 2048, D = 256 (x: 2 MiB, S: 16 MiB) in a fresh process:
    the forward's two products, which become x.grad and y.grad, and the tile buffers; nothing else N×D."""
    growth = peak_rss_growth("""
        torch.set_num_threads(2)
        x, y = torch.randn(2048, 256, requires_grad=True), torch.randn(2048, 256, requires_grad=True)
        mk.sigmoid_loss(x[:300], y[:300], 0.1, -10.0, backend="cpp").backward()   # load the library, warm up
        x.grad = y.grad = None
    """, """mk.sigmoid_loss(x, y, 0.1, -10.0, backend="cpp").backward()""")
    x_bytes = 2048 * 256 * 4
    # about 2.4 MiB measured; fresh gradients beside the products would add 2 · x_bytes
    assert growth <= 2 * x_bytes + 2**20, f"peak RSS grew by {growth / 2**20:.1f} MiB"
