"""The ``cpp`` backend (csrc/, mmts_kernels/cpp_backend) against the torch reference.

float64: values and every gradient to 1e-12 relative, and
gradcheck; fp32: the DESIGN §6 bar of 1e-5; bf16/fp16: the low-precision bound of ``check_backend_against_reference``.
Small tile shapes (MMTS_KERNELS_CPP_BLOCK) make small problems span many tiles, edge tiles and row chunks.
Also: bad input; threads, bitwise: the forward for any thread count, the deterministic backward for any thread
count, the default backward for a given one; the portable (non-AVX2) kernels forced by MMTS_KERNELS_CPP_ISA; no
O(N·M) allocation; backend="auto" picking cpp on the CPU. The first test to run builds the extension (about a minute).
"""
from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mmts_kernels as mk
from mmts_kernels import backends
from support import (AllocationRecorder, Case, backend_marker, cases, check_backend_against_reference,
                     gradcheck_loss, loss_and_grads, make_inputs, rel_err, run_python, with_dtype)

pytestmark = backend_marker("cpp")

F64_TOL = 1e-12  # ‖out − ref‖/‖ref‖, as in test_reference.py
SMALL_TILES = ("8x16", "5x7", "256x256")


def assert_f64_matches_reference(case: Case, **extra):
    ref = make_inputs(case, torch.float64)
    ref_out, ref_grads = loss_and_grads(ref, backend="torch")
    got = make_inputs(case, torch.float64)
    out, grads = loss_and_grads(got, backend="cpp", **extra)
    for name, a, b in [("loss", out, ref_out)] + [(k, grads[k], ref_grads[k]) for k in ref_grads]:
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
        err = rel_err(a, b)
        assert err <= F64_TOL, f"{name}: rel err {err:.3e} on {case}"


# ---------------------------------------------------------------------------------------------------------------
# float64: exact agreement with the reference, and gradcheck

@pytest.mark.parametrize("loss,hardest", [("infonce", False), ("max_margin", False), ("max_margin", True)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("mode", ["per_sample", "learnable_per_sample", "learnable_scalar", "dystress"])
def test_float64_every_loss_matches_reference(loss, hardest, symmetric, mode, monkeypatch):
    monkeypatch.setenv("MMTS_KERNELS_CPP_BLOCK", "8x16")
    for N, M, D, H in ((7, 5, 3, None), (37, 29, 11, 3), (70, 45, 5, None)):
        case = Case(N=N, M=N if symmetric else M, D=D, H=H, loss=loss, hardest_negative=hardest,
                    symmetric=symmetric, reduction="none", temperature_mode=mode,
                    margin_mode="learnable_per_sample", dtype=torch.float64, seed=N + D)
        assert_f64_matches_reference(case)


@given(cases(max_n=40, max_d=24), st.sampled_from(SMALL_TILES))
def test_float64_hypothesis(case, tiles):
    os.environ["MMTS_KERNELS_CPP_BLOCK"] = tiles
    try:
        assert_f64_matches_reference(with_dtype(case, torch.float64))
    finally:
        del os.environ["MMTS_KERNELS_CPP_BLOCK"]


@pytest.mark.parametrize("loss,hardest", [("infonce", False), ("max_margin", False), ("max_margin", True)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("deterministic", [False, True])
def test_gradcheck(loss, hardest, symmetric, deterministic, monkeypatch):
    monkeypatch.setenv("MMTS_KERNELS_CPP_BLOCK", "2x3")
    assert gradcheck_loss("cpp", loss, hardest, symmetric, deterministic=deterministic)


def test_gradcheck_heads_and_learnable_scalar_temperature():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    log_tau = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y, t: mk.info_nce(x, y, t.exp(), backend="cpp"), (x, y, log_tau))


# ---------------------------------------------------------------------------------------------------------------
# fp32 and low precision: the DESIGN §6 bars

@given(cases(max_n=64, max_d=64), st.sampled_from(SMALL_TILES))
def test_fp32_hypothesis(case, tiles):
    os.environ["MMTS_KERNELS_CPP_BLOCK"] = tiles
    try:
        check_backend_against_reference(case, "cpp")
    finally:
        del os.environ["MMTS_KERNELS_CPP_BLOCK"]


@given(cases(max_n=48, max_d=48, dtypes=(torch.bfloat16, torch.float16)))
def test_low_precision_hypothesis(case):
    check_backend_against_reference(case, "cpp")


@pytest.mark.parametrize("N,M,D", [(513, 513, 64), (300, 700, 33)])
def test_fp32_multi_tile_default_blocks(N, M, D):
    """Default 256×256 tiles: several row chunks, ragged edge tiles, both directions."""
    for loss, hardest in (("infonce", False), ("max_margin", False), ("max_margin", True)):
        for mode in ("learnable_per_sample", "dystress"):
            case = Case(N=N, M=M, D=D, loss=loss, hardest_negative=hardest, symmetric=N == M, reduction="none",
                        temperature_mode=mode, margin_mode="learnable_per_sample", seed=N)
            check_backend_against_reference(case, "cpp")


def test_extreme_temperature_unnormalized_inputs():
    """Online max: τ = 1e-3 on inputs of norm ~30 stays finite and matches the reference."""
    g = torch.Generator().manual_seed(1)
    x, y = 10 * torch.randn(300, 8, generator=g, dtype=torch.float64), 10 * torch.randn(300, 8, generator=g,
                                                                                       dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        got = mk.info_nce(x.to(dtype), y.to(dtype), 1e-3, backend="cpp", reduction="none")
        ref = mk.info_nce(x, y, 1e-3, backend="torch", reduction="none")
        assert torch.isfinite(got).all()
        assert rel_err(got, ref) <= (1e-12 if dtype == torch.float64 else 1e-5)


def test_nan_propagates():
    x, y = torch.randn(6, 3), torch.randn(6, 3)
    x[1, 2] = float("nan")
    assert torch.isnan(mk.info_nce(x, y, backend="cpp"))
    assert torch.isnan(mk.max_margin(x, y, backend="cpp"))


def test_non_contiguous_and_expanded_inputs():
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(40, 6, generator=g), torch.randn(40, 6, generator=g)
    xs, ys = x.T.contiguous().T, torch.stack([y, -y], 2).flatten(1)[:, ::2]
    tau = torch.tensor(0.1).expand(40)
    for loss in ("infonce", "max_margin"):
        a = mk.contrastive_loss(xs, ys, loss=loss, temperature=tau, margin=tau, backend="cpp")
        b = mk.contrastive_loss(x, y, loss=loss, temperature=tau, margin=tau, backend="torch")
        assert rel_err(a, b) <= 1e-6


# ---------------------------------------------------------------------------------------------------------------
# Bad input, availability, "auto"

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=torch.ones(3)), ValueError, "temperature"),
    (dict(loss="max_margin", margin=float("nan")), ValueError, "margin"),
    (dict(targets=torch.tensor([0, 1, 9, 2, 3, 4]), symmetric=False), ValueError, "targets"),
    (dict(reduction="avg"), ValueError, "reduction"),
])
def test_bad_input_through_cpp(kwargs, error, match):
    x, y = torch.randn(6, 4), torch.randn(6, 4)
    with pytest.raises(error, match=match):
        mk.contrastive_loss(x, y, backend="cpp", **kwargs)


def test_bad_shapes_and_dtypes_through_cpp():
    with pytest.raises(ValueError, match="D"):
        mk.info_nce(torch.randn(6, 4), torch.randn(6, 5), backend="cpp")
    with pytest.raises(TypeError, match="dtype"):
        mk.info_nce(torch.randn(6, 4), torch.randn(6, 4, dtype=torch.float64), backend="cpp")
    with pytest.raises(ValueError, match="symmetric"):
        mk.info_nce(torch.randn(6, 4), torch.randn(7, 4), backend="cpp")


def test_cuda_tensors_are_refused_with_a_reason():
    from mmts_kernels import cpp_backend

    assert cpp_backend.unavailable_reason(torch.device("cpu")) is None
    reason = cpp_backend.unavailable_reason(torch.device("cuda"))
    assert reason is not None and "CPU" in reason
    with pytest.raises(ValueError, match="cpp"):
        backends.resolve("cpp", torch.device("cuda"))


def test_auto_picks_cpp_on_cpu():
    assert backends.resolve("auto", torch.device("cpu")).__name__ == "mmts_kernels.cpp_backend"
    assert mk.available_backends()["cpp"] is None


def test_stats_contract():
    """Fields, dtypes and shapes of Stats as stats.py specifies them."""
    from mmts_kernels import cpp_backend
    from mmts_kernels.stats import StatsRequest

    x, y = torch.randn(2, 9, 4, dtype=torch.bfloat16), torch.randn(2, 9, 4, dtype=torch.bfloat16)
    tau, margin = torch.full((2, 9), 0.1), torch.full((2, 9), 0.2)
    req = StatsRequest(lse=True, hinge=True, hard=True, ws=True, cols=True)
    s = cpp_backend.compute_stats(x, y, tau, margin, torch.arange(9), req)
    for name, t in s._asdict().items():
        if name == "sig":  # the sigmoid statistic is requested on its own below
            assert t is None
            continue
        assert t is not None and t.shape == (2, 9), name
        assert t.dtype == (torch.int64 if name.startswith(("cnt", "arg")) else torch.float32), name
    s = cpp_backend.compute_stats(x, y, tau, None, torch.arange(9), StatsRequest(lse=True))
    assert s.lse is not None and s.hinge is None and s.lse_c is None and s.ws is None and s.sig is None
    s = cpp_backend.compute_stats(x, y, tau, None, torch.arange(9), StatsRequest(sigmoid=True), bias=-tau)
    assert s.sig.shape == (2, 9) and s.sig.dtype == torch.float32 and s.lse is None


def test_opcheck():
    """Schema, fake kernel and autograd registration of the operator (torch.library.opcheck)."""
    from mmts_kernels import cpp_backend  # noqa: F401  (registers the fake kernels and autograd)

    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 6, 3, generator=g, requires_grad=True)
    y = torch.randn(1, 6, 3, generator=g, requires_grad=True)
    tau = (0.1 + torch.rand(1, 6, generator=g)).requires_grad_()
    margin = (0.1 + torch.rand(1, 6, generator=g)).requires_grad_()
    args = (x, y, tau, margin, torch.arange(6), True, True, True, True, True, False, 0.0, 0.0, False, 4, 4)
    torch.library.opcheck(torch.ops.mmts_kernels.cpu_stats.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_sees_the_operator():
    """fullgraph=True: the loss traces through validation, the registered op, its fake kernel and its autograd."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(40, 8, generator=g, requires_grad=True), torch.randn(40, 8, generator=g, requires_grad=True)
    tau = (0.1 + torch.rand(40, generator=g)).requires_grad_()
    fn = torch.compile(lambda x, y, t: mk.info_nce(x, y, t, backend="cpp"), backend="aot_eager", fullgraph=True)
    a = fn(x, y, tau)
    b = mk.info_nce(x, y, tau, backend="cpp")
    assert torch.equal(a, b)
    for ga, gb in zip(torch.autograd.grad(a, (x, y, tau)), torch.autograd.grad(b, (x, y, tau))):
        assert torch.equal(ga, gb)


# ---------------------------------------------------------------------------------------------------------------
# Threads and determinism

def _run_all(deterministic: bool):
    g = torch.Generator().manual_seed(12)
    N, D = 700, 48
    x = torch.randn(2, N, D, generator=g)
    y = torch.randn(2, N, D, generator=g)
    tau = 0.05 + 0.1 * torch.rand(N, generator=g)
    results = []
    for kw in (dict(loss="infonce", temperature=tau), dict(loss="infonce", temperature=mk.DySTreSS(0.1, 0.2)),
               dict(loss="max_margin", margin=tau), dict(loss="max_margin", margin=0.2, hardest_negative=True)):
        leaves = [x.clone().requires_grad_(), y.clone().requires_grad_()]
        if "temperature" in kw and isinstance(kw["temperature"], torch.Tensor):
            kw = {**kw, "temperature": tau.clone().requires_grad_()}
            leaves.append(kw["temperature"])
        out = mk.contrastive_loss(leaves[0], leaves[1], backend="cpp", reduction="none",
                                  deterministic=deterministic, **kw)
        grads = torch.autograd.grad(out.sum(), leaves)
        results.append([out.detach(), *grads])
    return results


def _bitwise_equal(a_runs, b_runs) -> bool:
    return all(torch.equal(a, b) for al, bl in zip(a_runs, b_runs) for a, b in zip(al, bl))


def test_forward_is_bitwise_independent_of_the_thread_count():
    """The forward splits rows into fixed chunks merged in a fixed order, whatever the thread count (both
    backward modes share that forward)."""
    for deterministic in (False, True):
        forwards = [[run[0] for run in _with_threads(n, deterministic)] for n in (1, 2, 3)]
        for other in forwards[1:]:
            assert all(torch.equal(a, b) for a, b in zip(forwards[0], other)), deterministic


def test_deterministic_backward_is_bitwise_independent_of_the_thread_count():
    one, two, three = (_with_threads(n, True) for n in (1, 2, 3))
    assert _bitwise_equal(one, two) and _bitwise_equal(one, three)


def test_default_backward_is_reproducible_for_a_given_thread_count():
    """deterministic=False: the schedule (rounds over disjoint row × column parts, or per-thread dy buffers summed
    in task order) is fixed by the thread count: the same bits on every run with the same thread count; across
    thread counts only rounding differs."""
    for n in (1, 2):
        assert _bitwise_equal(_with_threads(n, False), _with_threads(n, False)), f"{n} threads"
    one, two = _with_threads(1, False), _with_threads(2, False)
    for a_list, b_list in zip(one, two):
        for a, b in zip(a_list, b_list):
            assert rel_err(a, b) <= 1e-6


def _with_threads(n: int, deterministic: bool):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return _run_all(deterministic)
    finally:
        torch.set_num_threads(before)


def test_many_threads_use_the_bufferless_backward():
    """Past 8 threads with fewer row or column blocks than threads (here 3 of 256 rows), the default backward drops
    its per-thread dy buffers for the two-pass schedule, which is thread-count independent: bitwise equal to
    deterministic=True on one thread."""
    many, one = _with_threads(12, False), _with_threads(1, True)
    assert _bitwise_equal(many, one)


# ---------------------------------------------------------------------------------------------------------------
# The portable (non-AVX2) kernels

def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def test_default_instruction_set_follows_the_cpu():
    from mmts_kernels import cpp_backend

    if os.environ.get("MMTS_KERNELS_CPP_ISA") == "portable":
        pytest.skip("MMTS_KERNELS_CPP_ISA=portable is set for this whole run")
    flags = _cpu_flags()
    if not flags:
        pytest.skip("needs /proc/cpuinfo to know whether this CPU has AVX2")
    assert cpp_backend.instruction_set() == ("avx2" if {"avx2", "fma"} <= flags else "portable")


def test_portable_kernels_forced_by_environment():
    """MMTS_KERNELS_CPP_ISA=portable: the baseline build of the float kernels runs, and meets the fp32 bar against
    the float64 reference (values and every gradient) for every loss, both directions and small ragged tiles."""
    out = run_python("""
        import os
        import torch
        from mmts_kernels import cpp_backend
        from support import Case, check_backend_against_reference
        print("isa", cpp_backend.instruction_set())
        os.environ["MMTS_KERNELS_CPP_BLOCK"] = "8x16"
        for loss, hardest in (("infonce", False), ("max_margin", False), ("max_margin", True)):
            for symmetric in (True, False):
                for mode in ("learnable_per_sample", "dystress"):
                    case = Case(N=37, M=37 if symmetric else 29, D=19, H=2, loss=loss, hardest_negative=hardest,
                                symmetric=symmetric, reduction="none", temperature_mode=mode,
                                margin_mode="learnable_per_sample", seed=3)
                    check_backend_against_reference(case, "cpp")
        print("checked")
    """, MMTS_KERNELS_CPP_ISA="portable")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["isa", "portable", "checked"], out.stdout
    bad = run_python("import torch, mmts_kernels as mk; mk.info_nce(torch.randn(4, 3), torch.randn(4, 3), "
                      "backend='cpp')", MMTS_KERNELS_CPP_ISA="sse9")
    assert bad.returncode != 0 and "MMTS_KERNELS_CPP_ISA" in bad.stderr, bad.stderr


# ---------------------------------------------------------------------------------------------------------------
# Memory

def test_no_n_by_m_tensor_is_allocated():
    N, D = 512, 32
    x, y = torch.randn(N, D, requires_grad=True), torch.randn(N, D, requires_grad=True)
    tau = torch.full((N,), 0.1, requires_grad=True)
    with AllocationRecorder() as rec:
        mk.info_nce(x, y, tau, backend="cpp").backward()
        mk.max_margin(x, y, tau.detach(), backend="cpp").backward()
    name, numel = rec.largest()
    assert numel < N * N // 8, (name, numel)
    with AllocationRecorder() as rec:  # the reference does materialize S (sanity check of the recorder)
        mk.info_nce(x, y, tau, backend="torch")
    assert rec.largest()[1] >= N * N


def peak_rss_growth(setup: str, measured: str) -> int:
    """Bytes the resident set's high-water mark grows by while ``measured`` runs, in a fresh process after
    ``setup`` (which loads the library and warms up). Linux only (/proc/self/status)."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc/self/status (Linux)")
    script = f"""
import json, torch, mmts_kernels as mk
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
{textwrap.dedent(setup)}
base = hwm()
{textwrap.dedent(measured)}
print(json.dumps({{"growth": hwm() - base}}))
"""
    out = run_python(script)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])["growth"]


def test_peak_memory_is_flat():
    """Peak RSS growth of fwd+bwd at N = M = 4096 (S would be 64 MiB) in a fresh process stays a few MiB."""
    growth = peak_rss_growth("""
        N, D = 4096, 64
        x, y = torch.randn(N, D, requires_grad=True), torch.randn(N, D, requires_grad=True)
        tau = torch.full((N,), 0.1, requires_grad=True)
        mk.info_nce(x[:300], y[:300], tau[:300], backend="cpp").backward()   # load the library, warm up
        x.grad = y.grad = tau.grad = None
        x.grad, y.grad = torch.zeros_like(x), torch.zeros_like(y)             # gradients are not extra memory
    """, """mk.info_nce(x, y, tau, backend="cpp").backward()""")
    assert growth < 4096 * 4096 * 4 // 4, f"peak RSS grew by {growth / 2**20:.1f} MiB"
