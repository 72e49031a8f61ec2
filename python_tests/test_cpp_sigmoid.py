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
from support import AllocationRecorder, backend_marker, rel_err, run_python
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
    classes = max(1, min(classes, N))
    self_cols = None
    if same_tensor:  # N = 2B: positive a ± B, self a; both views share their sample's label
        B = N // 2
        i = torch.arange(B)
        targets, self_cols = torch.cat((i + B, i)), torch.cat((i, i + B))
        base = torch.arange(B) % max(2, classes)
        lx = ly = torch.cat((base, base))
    elif square:
        targets = torch.arange(N)
        lx = ly = torch.randint(0, classes, (N,), generator=g)
    else:
        targets = torch.randint(0, M, (N,), generator=g)
        ly = torch.randint(0, classes, (M,), generator=g)
        lx = ly[targets]  # the target is a same-label column
        if kind == "sigmoid_ring":  # rows without a positive in this y
            targets = torch.where(torch.rand(N, generator=g) < 0.5, -1, targets)
            lx = torch.where(targets < 0, torch.randint(0, classes, (N,), generator=g), lx)
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
