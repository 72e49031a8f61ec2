"""The ``triton`` backend against the float64 torch reference: values and every gradient (DESIGN §3, §6).

Without a CUDA GPU the kernels run in Triton's interpreter on the CPU (TRITON_INTERPRET=1, set by conftest.py before
triton is imported) at small sizes with 16-wide tiles, so every multi-tile path runs: the row and column partial
merges, several column panels (forward and backward), several D steps. With a GPU the same tests run compiled, at
larger sizes. What the compiler makes of the kernels for an H100 is checked without a GPU in
test_triton_compile.py.
"""
from __future__ import annotations

import os

import torch

# TRITON_INTERPRET=1 is set by conftest.py when no GPU is visible (before anything imports triton).
import pytest
from hypothesis import given, settings

import mmts_kernels as mk
from mmts_kernels import reference
from mmts_kernels.stats import StatsRequest
from support import (
    AllocationRecorder, Case, backend_marker, cases, check_backend_against_reference, loss_and_grads, make_inputs,
    rel_err, requires_cuda, with_dtype,
)
from support import test_device as _device_for  # aliased: pytest would collect a test_* name

pytestmark = backend_marker("triton")

DEVICE = _device_for("triton")
ON_GPU = DEVICE.type == "cuda"
# Sizes: the interpreter executes every program in numpy, one after the other.
MAX_N, MAX_D = (300, 200) if ON_GPU else (40, 40)
N_SMALL = 130 if ON_GPU else 18  # > one 16-wide tile on the CPU, > two 64-wide tiles on the GPU


def _examples(cpu: int) -> settings:
    return settings(max_examples=cpu if not ON_GPU else max(cpu, 25))


def _tiles(**kw):
    from mmts_kernels.triton_backend import op

    base = op.GPU_CONFIG if ON_GPU else op.INTERPRETER_CONFIG
    return op.tile_config(op.Config(**{**base.__dict__, **kw}))


# ---------------------------------------------------------------------------------------------------------------
# Property-based: the reference's case strategy, every loss / temperature / margin mode / reduction / head count.

@_examples(20)
@given(cases(max_n=MAX_N, max_d=MAX_D))
def test_matches_reference_fp32(case):
    check_backend_against_reference(case, "triton")


@_examples(12)
@given(cases(max_n=MAX_N, max_d=MAX_D, dtypes=(torch.bfloat16, torch.float16)))
def test_matches_reference_low_precision(case):
    """bf16/fp16: no worse than the torch reference computed in the same low precision (plus a small slack)."""
    check_backend_against_reference(case, "triton")


@_examples(5)
@given(cases(max_n=24, max_d=24, dtypes=(torch.float64,)))
def test_matches_reference_fp64(case):
    """fp64 inputs stay in fp64 throughout (DySTreSS bounds included): the 1e-12 bar of DESIGN §6."""
    check_backend_against_reference(case, "triton", fp32_tol=1e-12)


@_examples(4)
@given(cases(max_n=MAX_N, max_d=MAX_D))
def test_matches_reference_deterministic(case):
    check_backend_against_reference(case, "triton", deterministic=True)


# ---------------------------------------------------------------------------------------------------------------
# Explicit grid: every loss × direction × reduction × temperature (or margin) mode.

LOSSES = [("infonce", False), ("max_margin", False), ("max_margin", True)]


@pytest.mark.parametrize("loss,hardest", LOSSES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_loss_reduction_and_mode(loss, hardest, symmetric, reduction):
    if loss == "infonce":
        modes = [dict(temperature_mode=m) for m in
                 ("float", "scalar_tensor", "per_sample", "learnable_scalar", "learnable_per_sample", "dystress")]
    else:
        modes = [dict(margin_mode=m) for m in ("float", "per_sample", "learnable_per_sample")]
    for i, mode in enumerate(modes):
        case = Case(N=N_SMALL, M=N_SMALL if symmetric else N_SMALL - 5, D=5, loss=loss, hardest_negative=hardest,
                    symmetric=symmetric, reduction=reduction, seed=100 + i, **mode)
        check_backend_against_reference(case, "triton")


@pytest.mark.parametrize("N,M,D,H,symmetric", [
    (2, 2, 1, None, True),      # D = 1 (masked feature tile), the smallest symmetric batch
    (1, 5, 3, None, False),     # a single row
    (N_SMALL, 3, 1, None, False),  # N ≠ M, more rows than columns
    (5, N_SMALL + 3, 7, 3, False),  # heads, more columns than rows
    (N_SMALL + 1, N_SMALL + 1, 17, 2, True),  # heads, ragged tiles everywhere
])
def test_shapes(N, M, D, H, symmetric):
    for loss, hardest in LOSSES:
        case = Case(N=N, M=M, D=D, H=H, loss=loss, hardest_negative=hardest, symmetric=symmetric,
                    temperature_mode="learnable_per_sample", margin_mode="learnable_per_sample", seed=N + M + D)
        check_backend_against_reference(case, "triton")


def test_several_panels_and_feature_steps():
    """D spread over several BLOCK_D steps in the S tile; one column block per panel, so the forward's partial
    merges carry row state across panels and the backward accumulates dx over several panels."""
    with _tiles(block_d=16, panel_blocks=1):
        for loss, hardest in LOSSES:
            case = Case(N=N_SMALL, M=N_SMALL, D=40, H=2, loss=loss, hardest_negative=hardest,
                        temperature_mode="learnable_per_sample", margin_mode="learnable_per_sample", seed=7)
            check_backend_against_reference(case, "triton")


def test_unnormalized_inputs_and_tiny_temperature():
    """No fixed shift: |S|/τ in the thousands stays exact (online max), for per-sample τ and DySTreSS alike."""
    for mode in ("learnable_per_sample", "dystress"):
        case = Case(N=N_SMALL, M=N_SMALL, D=6, scale=3.0, tau_lo=1e-3, tau_hi=2e-3, temperature_mode=mode,
                    seed=21)
        check_backend_against_reference(case, "triton")


@pytest.mark.parametrize("make", [
    lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2),  # column-major
    lambda t: torch.stack([t, -t], -1).flatten(-2)[..., ::2],  # feature stride 2
    lambda t: t[..., :1].expand(t.shape),  # stride 0 along the features
], ids=["column_major", "strided", "expanded"])
def test_non_contiguous_inputs(make):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, N_SMALL, 6, generator=g).to(DEVICE)
    y = torch.randn(2, N_SMALL, 6, generator=g).to(DEVICE)
    tau = (0.1 + torch.rand(N_SMALL, generator=g)).to(DEVICE)  # [N]: an expanded, stride-0 [H, N] view inside
    margin = (0.1 + 0.3 * torch.rand(2, N_SMALL, generator=g)).to(DEVICE).t().contiguous().t()  # [H, N] col-major
    xs, ys = make(x), make(y)
    assert not xs.is_contiguous()
    for loss, hardest in LOSSES:
        kw = dict(loss=loss, hardest_negative=hardest, temperature=tau, margin=margin, reduction="none")
        got = mk.contrastive_loss(xs, ys, backend="triton", **kw)
        want = mk.contrastive_loss(xs.double(), ys.double(), backend="torch",
                                   **{**kw, "temperature": tau.double(), "margin": margin.double()})
        assert rel_err(got, want) <= 1e-5


def test_expanded_temperature_gradient_sums_back():
    """τ given as [N] reaches the op as an expanded [H, N] view; its gradient has the shape the caller gave."""
    case = Case(N=N_SMALL, M=N_SMALL, D=4, H=3, temperature_mode="learnable_per_sample", seed=5)
    inputs = make_inputs(case, torch.float32, DEVICE)
    _, grads = loss_and_grads(inputs, backend="triton")
    assert grads["temperature"].shape == (N_SMALL,)
    check_backend_against_reference(case, "triton")


def test_nan_propagates():
    x = torch.randn(N_SMALL, 3, device=DEVICE)
    y = torch.randn(N_SMALL, 3, device=DEVICE)
    x[1, 2] = float("nan")
    for loss in ("infonce", "max_margin"):
        assert torch.isnan(mk.contrastive_loss(x, y, loss=loss, backend="triton"))


# ---------------------------------------------------------------------------------------------------------------
# The statistics themselves: ties, determinism, the column merge.

def _stats(x, y, tau, margin, targets, request):
    from mmts_kernels import triton_backend

    return triton_backend.compute_stats(x, y, tau, margin, targets, request)


@pytest.mark.parametrize("deterministic", [False, True])
def test_hardest_negative_ties_pick_the_lowest_index(deterministic):
    """Equal negatives in different tiles: rows and columns both report the lowest index, whatever order the
    tiles (and, for columns, the row blocks) are merged in."""
    n = 2 * N_SMALL
    g = torch.Generator().manual_seed(3)
    base = torch.randn(n, 4, generator=g)
    x, y = base.clone(), base.clone()
    y[n - 2] = y[3]  # column n−2 duplicates column 3 (a later tile): ties in every row
    x[n - 1] = x[2]  # row n−1 duplicates row 2: ties in every column
    x, y = x[None].to(DEVICE), y[None].to(DEVICE)
    margin = torch.full((1, n), 0.2, device=DEVICE)
    req = StatsRequest(hard=True, cols=True, deterministic=deterministic)
    got = _stats(x, y, None, margin, torch.arange(n, device=DEVICE), req)
    want = reference.compute_stats(x, y, None, margin, torch.arange(n, device=DEVICE), req)
    for name in ("arg", "arg_c"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    for name in ("hard", "hard_c", "pos"):
        assert rel_err(getattr(got, name), getattr(want, name)) <= 1e-6, name


def test_deterministic_is_bitwise_reproducible():
    """Every merge has a fixed order, so repeated runs agree bit for bit, and deterministic=True (free here) is the
    same computation as the default."""
    case = Case(N=3 * N_SMALL, M=3 * N_SMALL, D=9, H=2, temperature_mode="learnable_per_sample", seed=31)
    runs = []
    for deterministic in (True, True, False):
        inputs = make_inputs(case, torch.float32, DEVICE)
        runs.append(loss_and_grads(inputs, backend="triton", deterministic=deterministic))
    (out_a, grads_a), *others = runs
    for out_b, grads_b in others:
        assert torch.equal(out_a, out_b)
        for name in grads_a:
            assert torch.equal(grads_a[name], grads_b[name]), name


def test_every_statistic_against_the_reference():
    """All fields at once, rows and columns, learnable τ (ws, ws_c) and hinge counts."""
    g = torch.Generator().manual_seed(12)
    H, n = 2, 2 * N_SMALL + 3
    x = torch.randn(H, n, 7, generator=g, dtype=torch.float64)
    y = torch.randn(H, n, 7, generator=g, dtype=torch.float64)
    tau = 0.1 + torch.rand(H, n, generator=g, dtype=torch.float64)
    margin = 0.5 * torch.rand(H, n, generator=g, dtype=torch.float64)
    targets = torch.arange(n)
    for hard in (False, True):
        req = StatsRequest(lse=True, hinge=not hard, hard=hard, ws=True, cols=True)
        want = reference.compute_stats(x, y, tau, margin, targets, req)
        got = _stats(x.float().to(DEVICE), y.float().to(DEVICE), tau.float().to(DEVICE),
                     margin.float().to(DEVICE), targets.to(DEVICE), req)
        for name, ref in want._asdict().items():
            value = getattr(got, name)
            assert (ref is None) == (value is None), name
            if ref is None:
                continue
            if ref.dtype == torch.int64:  # counts and argmaxes: exact (no ties / threshold cases in this draw)
                assert torch.equal(value.cpu(), ref), name
            else:
                assert rel_err(value, ref) <= 1e-5, name


# ---------------------------------------------------------------------------------------------------------------
# Issue 18: the sigmoid statistic and the same-label switches. The backend-generic float64 comparison over random
# shapes is test_sigmoid_labels_stats.py; here the paths only forced tiles reach (several panels, forward and
# backward, several D steps), low precision, and the row sums behind the τ and bias gradients.

def _labelled_case(kind: str, seed: int, n: int = 2 * N_SMALL + 3, m: int = 2 * N_SMALL - 5, D: int = 37):
    """float64 compute_stats arguments, leaves requiring grad: a sigmoid request with rows of every kind (a
    positive, none: −1, several same-label columns), or symmetric InfoNCE + max-margin + hardest with the mask."""
    g = torch.Generator().manual_seed(seed)
    sigmoid = kind.startswith("sigmoid")
    m = m if sigmoid else n
    x = (torch.randn(2, n, D, generator=g, dtype=torch.float64) / D ** 0.5).requires_grad_()
    y = (torch.randn(2, m, D, generator=g, dtype=torch.float64) / D ** 0.5).requires_grad_()
    tau = (0.05 + torch.rand(2, n, generator=g, dtype=torch.float64)).requires_grad_()
    bias = (torch.rand(2, n, generator=g, dtype=torch.float64) * 6 - 4).requires_grad_()
    margin = (0.05 + 0.4 * torch.rand(2, n, generator=g, dtype=torch.float64)).requires_grad_()
    ly = torch.randint(0, 5, (m,), generator=g)
    if sigmoid:
        targets = torch.randint(0, m, (n,), generator=g)
        lx = ly[targets]
        targets = torch.where(torch.arange(n) % 3 == 0, -1, targets)  # rows without a positive in this block
        same = {"sigmoid": None, "sigmoid_mask": "mask", "sigmoid_positive": "positive"}[kind]
        request = StatsRequest(sigmoid=True, same_label=same)
        args = (x, y, tau, None, targets, request)
        kwargs = dict(bias=bias, labels=(lx, ly) if same else None)
        return args, kwargs, dict(x=x, y=y, tau=tau, bias=bias)
    targets, lx = torch.arange(n), ly
    request = StatsRequest(lse=True, ws=True, hinge=True, hard=kind == "hard_mask", cols=True, same_label="mask")
    args = (x, y, tau, margin, targets, request)
    return args, dict(labels=(lx, ly)), dict(x=x, y=y, tau=tau, margin=margin)


def _weighted_total(stats, seed):
    g = torch.Generator().manual_seed(seed)
    return sum((torch.randn(v.shape, generator=g, dtype=torch.float64) * v.double()).where(v.isfinite(), 0.0).sum()
               for name, v in stats._asdict().items()
               if v is not None and v.is_floating_point() and name not in ("ws", "ws_c"))


@pytest.mark.parametrize("kind", ["sigmoid", "sigmoid_mask", "sigmoid_positive", "lse_hinge_mask", "hard_mask"])
def test_sigmoid_and_labels_across_panels(kind):
    """One column block per panel (forward partial merges across panels; the backward's dS panels and its
    per-panel row sums of ∂L/∂u) and three D steps: values and every gradient to 1e-9 in float64."""
    from mmts_kernels import triton_backend

    args, kwargs, leaves = _labelled_case(kind, seed=len(kind))
    want = reference.compute_stats(*args, **kwargs)
    want_grads = torch.autograd.grad(_weighted_total(want, 1), list(leaves.values()))
    with _tiles(panel_blocks=1, bwd_panel_factor=1):
        got = triton_backend.compute_stats(*[a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args],
                                           **kwargs)
        got_grads = torch.autograd.grad(_weighted_total(got, 1), list(leaves.values()))
    for name, ref in want._asdict().items():
        if ref is None:
            continue
        value = getattr(got, name).cpu()
        if name in ("arg", "arg_c"):
            assert torch.equal(value[want.hard.isfinite()] if name == "arg" else value[want.hard_c.isfinite()],
                               ref[want.hard.isfinite()] if name == "arg" else ref[want.hard_c.isfinite()]), name
        elif ref.dtype == torch.int64:
            assert torch.equal(value, ref), name
        else:
            assert torch.equal(value.isfinite(), ref.isfinite()), name
            assert rel_err(value[ref.isfinite()], ref[ref.isfinite()]) <= 1e-9, name
    for name, a, b in zip(leaves, got_grads, want_grads):
        assert rel_err(a, b) <= 1e-9, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sigmoid_low_precision(dtype):
    """16-bit and fp32 inputs: S in fp32 from the rounded inputs, so sig and its gradients match the float64
    formula on those rounded inputs to fp32 accuracy (fp16: through the scaled ∂L/∂S), the x and y gradients to
    their own dtype's rounding."""
    from mmts_kernels import triton_backend

    args, kwargs, leaves = _labelled_case("sigmoid_positive", seed=8, D=9)
    x16, y16 = args[0].detach().to(dtype), args[1].detach().to(dtype)
    x64, y64 = x16.double().requires_grad_(), y16.double().requires_grad_()
    tau, bias = leaves["tau"], leaves["bias"]
    ref = reference.compute_stats(x64, y64, tau, None, *args[4:], **kwargs).sig
    ref_grads = torch.autograd.grad((ref * ref.detach().sign()).sum(), [x64, y64, tau, bias])
    xd, yd = x16.to(DEVICE).requires_grad_(), y16.to(DEVICE).requires_grad_()
    taud, biasd = tau.detach().float().to(DEVICE).requires_grad_(), bias.detach().float().to(DEVICE).requires_grad_()
    kw = dict(kwargs, bias=biasd)
    out = triton_backend.compute_stats(xd, yd, taud, None, args[4].to(DEVICE), args[5], **kw).sig
    grads = torch.autograd.grad((out * ref.sign().to(out)).sum(), [xd, yd, taud, biasd])
    assert out.dtype == torch.float32
    assert rel_err(out, ref) <= 1e-5
    for name, a, b, tol in zip(("x", "y", "tau", "bias"), grads, ref_grads, (1e-2, 1e-2, 1e-5, 1e-5)):
        assert a.dtype == (dtype if name in ("x", "y") else torch.float32), name
        assert rel_err(a, b) <= tol, (name, rel_err(a, b))


def test_sigmoid_needs_no_bias_or_tau_sums_without_their_grad():
    """The backward's row sums run only for τ or the bias requiring grad; x and y alone get the same gradients."""
    from mmts_kernels import triton_backend

    args, kwargs, leaves = _labelled_case("sigmoid_mask", seed=3)
    x, y, tau, bias = leaves["x"], leaves["y"], leaves["tau"].detach(), leaves["bias"].detach()
    want = reference.compute_stats(x, y, tau, None, *args[4:], **dict(kwargs, bias=bias))
    got = triton_backend.compute_stats(x, y, tau, None, *args[4:], **dict(kwargs, bias=bias))
    a = torch.autograd.grad(_weighted_total(got, 2), [x, y])
    b = torch.autograd.grad(_weighted_total(want, 2), [x, y])
    for u, v in zip(a, b):
        assert rel_err(u, v) <= 1e-9


def test_fp32_precision_follows_torch():
    """tl.dot on fp32 follows PyTorch's matmul precision: "highest" → three TF32 products (fp32-accurate),
    "high"/"medium" → TF32, as torch.matmul; fp64 and the interpreter are exact. Also through the per-backend API
    (torch ≥ 2.9), after which the legacy getter raises."""
    from types import SimpleNamespace

    from mmts_kernels.triton_backend.forward import dot_precision

    cuda32 = SimpleNamespace(dtype=torch.float32, device=torch.device("cuda"))
    previous = torch.get_float32_matmul_precision()
    try:
        for setting, want in (("highest", "tf32x3"), ("high", "tf32"), ("medium", "tf32")):
            torch.set_float32_matmul_precision(setting)
            assert dot_precision(cuda32) == want
            assert dot_precision(SimpleNamespace(dtype=torch.float64, device=torch.device("cuda"))) == "ieee"
            assert dot_precision(torch.zeros(1)) == "ieee"
    finally:
        torch.set_float32_matmul_precision(previous)


def test_fp32_precision_through_the_per_backend_api():
    """A subprocess: once torch.backends.cuda.matmul.fp32_precision is set, the legacy getter raises for good."""
    code = (
        "import torch\n"
        "from types import SimpleNamespace\n"
        "from mmts_kernels.triton_backend.forward import dot_precision\n"
        "from mmts_kernels.triton_backend.backward import _tf32_products\n"
        "cuda32 = SimpleNamespace(dtype=torch.float32, device=torch.device('cuda'))\n"
        "api = torch.backends.cuda.matmul\n"
        "if not hasattr(api, 'fp32_precision'): print('tf32x3 tf32 tf32 ieee'); raise SystemExit\n"
        "api.fp32_precision = 'ieee'\n"
        "a = dot_precision(cuda32)\n"
        "with _tf32_products():\n"
        "    inside = api.fp32_precision\n"
        "restored = api.fp32_precision\n"
        "api.fp32_precision = 'tf32'\n"
        "print(a, dot_precision(cuda32), inside, restored)\n"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["tf32x3", "tf32", "tf32", "ieee"], out.stdout


def test_panels_fit_the_cuda_grid():
    """A panel's column blocks go on grid axis 1, which CUDA caps at 65535: a huge M gets more panels instead."""
    from mmts_kernels.triton_backend.forward import MAX_GRID_Y, panel_width

    assert panel_width(1024, 5_000_000, 128, 1, 64) == MAX_GRID_Y * 64
    assert panel_width(100, 300, 8, 10, 16) % 16 == 0


def test_tuning_config_from_the_environment():
    from mmts_kernels.triton_backend import op

    cfg = op._parse_config("block_n=64, num_warps=4", op.GPU_CONFIG)
    assert (cfg.block_n, cfg.num_warps, cfg.block_m) == (64, 4, op.GPU_CONFIG.block_m)
    with pytest.raises(ValueError, match="MMTS_KERNELS_TRITON_CONFIG.*block_q"):
        op._parse_config("block_q=3", op.GPU_CONFIG)


def test_tf32_split_is_exact():
    """The backward's "highest" GEMMs split fp32 operands as hi + lo with hi on the TF32 grid (10 mantissa bits):
    hi + lo == a exactly, |lo| ≤ 2⁻¹¹|a|, so hi·hi + hi·lo + lo·hi misses a·b by ≈ 2⁻²² relative."""
    from mmts_kernels.triton_backend.backward import _tf32_split

    a = torch.randn(1000, dtype=torch.float64).mul(10.0 ** torch.randint(-20, 20, (1000,))).float()
    hi, lo = _tf32_split(a)
    assert torch.equal(hi + lo, a)
    assert (hi.view(torch.int32) & 0x1FFF).eq(0).all()
    assert (lo.abs() <= a.abs() * 2.0**-11).all()


def test_host_gemm_accumulates_panels():
    """dx accumulates dS·y over column panels; dy's panel rows are written once (backward.matmul on the CPU)."""
    from mmts_kernels.triton_backend.backward import matmul

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(7, 5, generator=g), torch.randn(5, 3, generator=g)
    for dtype in (torch.float32, torch.bfloat16):  # bf16 operands, fp32 result (a fallback where torch lacks it)
        out = torch.full((7, 3), float("nan"))
        matmul(a.to(dtype), b.to(dtype), out, accumulate=False)
        matmul(a.to(dtype), b.to(dtype), out, accumulate=True)
        torch.testing.assert_close(out, 2 * a.to(dtype).float() @ b.to(dtype).float(), rtol=1e-2, atol=1e-2)


def test_fp16_gradient_scale():
    """fp16 ∂L/∂S is stored scaled by a power of two that bounds it by 1: softmax gradients of a large batch at a
    small τ (≈ p/(τN) ~ 1e-8) would underflow fp16 unscaled, and hinge counts (up to N) would overflow it."""
    from mmts_kernels.triton_backend.backward import grad_scale

    n = 65536
    tau = torch.full((1, n), 0.01)
    g = {"pos": torch.full((1, n), -1.0 / n), "lse": torch.full((1, n), 0.5 / n), "lse_c": torch.full((1, n), 0.5 / n)}
    x16 = torch.zeros(1, dtype=torch.float16)
    s = grad_scale(x16, g, tau, torch.float32, False, 0.0)
    bound = (1.0 / n + 2 * 0.5 / n / 0.01) + 2.0**-14
    assert float(s * bound) <= 1.0 < float(2 * s * bound)
    assert float(torch.log2(s)) == round(float(torch.log2(s)))
    assert float(grad_scale(torch.zeros(1), g, tau, torch.float32, False, 0.0)) == 1.0  # fp32/bf16: no scale


def test_unsupported_dtype_is_a_clear_error():
    x = torch.randint(0, 3, (1, 4, 2), device=DEVICE)
    with pytest.raises(ValueError, match="int64"):
        _stats(x, x, None, None, torch.arange(4, device=DEVICE), StatsRequest(lse=True))


def test_unavailable_reason(monkeypatch):
    from mmts_kernels import triton_backend

    assert triton_backend.unavailable_reason(torch.device("cuda")) is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = triton_backend.unavailable_reason(torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_backend.unavailable_reason(torch.device("cpu")) is None
    assert triton_backend.unavailable_reason(None) is None


# ---------------------------------------------------------------------------------------------------------------
# Memory: no tensor of N·M elements, forward or backward.

def test_no_allocation_of_the_similarity_matrix():
    n, D = (2048, 8) if ON_GPU else (64, 3)  # N·M = 4096 on the CPU, while (N+M)·D = 384
    for loss, hardest in LOSSES:
        case = Case(N=n, M=n, D=D, loss=loss, hardest_negative=hardest, temperature_mode="learnable_per_sample",
                    margin_mode="learnable_per_sample", seed=2)
        inputs = make_inputs(case, torch.float32, DEVICE)
        with AllocationRecorder() as rec:
            loss_and_grads(inputs, backend="triton")
        op, numel = rec.largest()
        assert numel < n * n // 4, f"{loss}: {op} allocated {numel} elements (N·M = {n * n})"


# ---------------------------------------------------------------------------------------------------------------
# torch.library registration: opcheck and torch.compile.

def _op_samples():
    g = torch.Generator().manual_seed(4)
    H, N, D = 2, N_SMALL, 5

    def leaf(*shape, lo=0.0):
        return (lo + torch.rand(*shape, generator=g)).to(DEVICE).requires_grad_()

    x, y = leaf(H, N, D, lo=-0.5), leaf(H, N, D, lo=-0.5)
    tau, margin = leaf(H, N, lo=0.1), leaf(H, N)
    t = torch.arange(N, device=DEVICE)
    targets = torch.randint(0, N, (N,), generator=g).to(DEVICE)
    bias = leaf(H, N, lo=-2.0)
    labels = torch.randint(0, 3, (N,), generator=g).to(DEVICE)
    ring = torch.where(torch.arange(N, device=DEVICE) % 2 == 0, -1, targets)  # rows without a positive
    return [  # (x, y, tau, margin, targets, lse, hinge, hard, ws, cols, dystress, tau_min, tau_max, deterministic)
        (x, y, tau, None, t, True, False, False, True, True, False, 0.0, 0.0, False),
        (x, y, None, margin, targets, False, True, False, False, False, False, 0.0, 0.0, True),
        (x, y, None, None, t, False, False, True, False, True, False, 0.0, 0.0, False),
        (x, y, None, None, t, True, False, False, False, True, True, 0.1, 0.2, False),
        # … self_cols, decoupled, dys_grad, bias, labels_x, labels_y, sigmoid, same_label (0 none, 1 mask, 2 positive)
        (x, y, tau, None, ring, False, False, False, False, False, False, 0.0, 0.0, False,
         None, False, False, bias, None, None, True, 0),
        (x, y, tau, None, ring, False, False, False, False, False, False, 0.0, 0.0, False,
         None, False, False, bias, labels[targets], labels, True, 1),
        (x, y, tau, margin, t, True, True, False, True, True, False, 0.0, 0.0, False,
         None, False, False, None, labels, labels, False, 1),
    ]


@pytest.mark.parametrize("index", range(7))
def test_opcheck(index):
    from mmts_kernels.triton_backend import op  # noqa: F401  (registers the ops)

    torch.library.opcheck(torch.ops.mmts_kernels.triton_stats, _op_samples()[index])


def _leaves():
    """x, y [2, N, 5]; per-sample τ and margin [N] (expanded to [H, N] inside), all requiring grad."""
    g = torch.Generator().manual_seed(6)
    x, y = (torch.randn(2, N_SMALL, 5, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    tau = (0.1 + torch.rand(N_SMALL, generator=g)).to(DEVICE).requires_grad_()
    margin = (0.1 + 0.3 * torch.rand(N_SMALL, generator=g)).to(DEVICE).requires_grad_()
    return x, y, tau, margin


def _compile(fn):
    torch._dynamo.reset()
    # aot_eager on the CPU: traces forward and backward through the fake implementations without a C++ toolchain
    return torch.compile(fn, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")


def _compare_compiled(fn, *leaves):
    out = _compile(fn)(*leaves)
    grads = torch.autograd.grad(out, leaves)
    out_e = fn(*leaves)
    grads_e = torch.autograd.grad(out_e, leaves)
    assert rel_err(out, out_e) <= 1e-6
    for a, b in zip(grads, grads_e):
        assert rel_err(a, b) <= 1e-6


def test_compile_fullgraph_backend_op():
    """The op and the losses on top trace into one graph, forward and backward."""
    from mmts_kernels import losses, triton_backend
    from mmts_kernels.validation import validate

    x, y, tau, margin = _leaves()

    def model(x, y, tau, margin):
        total = 0.0
        for loss, hard in LOSSES:
            p = validate(x, y, loss=loss, temperature=tau, margin=margin, hardest_negative=hard, targets=None,
                         symmetric=True, reduction="mean", check_finite=False, backend="triton",
                         deterministic=None)
            stats = triton_backend.compute_stats(p.x, p.y, p.tau, p.margin, p.targets, p.request)
            terms = losses.per_anchor_terms(stats, loss=loss, hardest_negative=hard, tau=p.tau, dystress=None,
                                            margin=p.margin, symmetric=True)
            total = total + losses.reduce_terms(terms, loss=loss, hardest_negative=hard, reduction="mean",
                                                num_cols=p.y.shape[1], has_heads=True)
        return total

    _compare_compiled(model, x, y, tau, margin)


def test_compile_fullgraph_sigmoid_and_labels():
    """The sigmoid statistic (τ and bias requiring grad) and the label mask trace into one graph too."""
    from mmts_kernels import triton_backend

    x, y, tau, margin = _leaves()
    bias = torch.linspace(-3.0, 1.0, N_SMALL, device=DEVICE).requires_grad_()
    labels = torch.arange(N_SMALL, device=DEVICE) % 3
    rows = torch.arange(N_SMALL, device=DEVICE)

    def model(x, y, tau, margin, bias):
        H = x.shape[0]
        t, b = tau.expand(H, -1), bias.expand(H, -1)
        sig = triton_backend.compute_stats(x, y, t, None, rows, StatsRequest(sigmoid=True, same_label="positive"),
                                           bias=b, labels=(labels, labels)).sig
        masked = triton_backend.compute_stats(x, y, t, margin.expand(H, -1), rows,
                                              StatsRequest(lse=True, ws=True, hinge=True, cols=True,
                                                           same_label="mask"), labels=(labels, labels))
        return sig.mean() + (masked.lse - masked.pos / t).mean() + masked.lse_c.mean() + masked.hinge_c.mean()

    _compare_compiled(model, x, y, tau, margin, bias)


def test_compile_fullgraph_public_api():
    """A model calling the public API with backend="triton": one graph (validation, dispatch, op, loss)."""
    x, y, tau, margin = _leaves()

    def model(x, y, tau, margin):
        return (mk.info_nce(x, y, temperature=tau, backend="triton")
                + mk.info_nce(x, y, temperature=mk.DySTreSS(0.1, 0.2), backend="triton")
                + mk.max_margin(x, y, margin=margin, backend="triton")
                + mk.max_margin(x, y, margin=margin, hardest_negative=True, backend="triton"))

    _compare_compiled(model, x, y, tau, margin)


# ---------------------------------------------------------------------------------------------------------------
# GPU only: sizes the interpreter cannot reach.

@requires_cuda
@pytest.mark.parametrize("symmetric", [True, False])
def test_cuda_more_than_2_pow_31_pairs(symmetric):
    """N·M ≥ 2³¹ pairs: every index is int64; the reference is computed in row chunks of float64."""
    n, D = 47_000, 16
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(n, D, device="cuda", generator=g), dim=1)
    y = torch.nn.functional.normalize(torch.randn(n, D, device="cuda", generator=g), dim=1)
    tau = 0.05 + 0.1 * torch.rand(n, device="cuda", generator=g)
    kw = dict(symmetric=symmetric, reduction="none")
    if not symmetric:
        kw["targets"] = torch.arange(n, device="cuda").flip(0)
    got = mk.info_nce(x, y, tau, backend="triton", **kw)
    xd, yd, td = x.double(), y.double(), tau.double()
    t = kw.get("targets", torch.arange(n, device="cuda"))
    row = torch.cat([torch.logsumexp(xd[i:i + 4096] @ yd.T / td[i:i + 4096, None], 1) for i in range(0, n, 4096)])
    pos = (xd * yd[t]).sum(1)
    want = row - pos / td
    if symmetric:
        col = torch.cat([torch.logsumexp(yd[j:j + 4096] @ xd.T / td[j:j + 4096, None], 1)
                         for j in range(0, n, 4096)])
        want = torch.stack((want, col - pos / td))
    assert rel_err(got, want) <= 1e-5


@requires_cuda
def test_cuda_large_batch_gradients():
    for loss, hardest in LOSSES:
        case = Case(N=1000, M=1000, D=256, H=2, loss=loss, hardest_negative=hardest,
                    temperature_mode="learnable_per_sample", margin_mode="learnable_per_sample", seed=1)
        check_backend_against_reference(case, "triton")
        check_backend_against_reference(with_dtype(case, torch.bfloat16), "triton")
