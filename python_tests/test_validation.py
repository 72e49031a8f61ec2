"""Every bad input of DESIGN §7 raises ValueError/TypeError naming the argument, before any backend runs."""
from __future__ import annotations

import pytest
import torch

import mmts_kernels as mk
from mmts_kernels import backends
from support import requires_cuda

x4, y4 = torch.randn(4, 3), torch.randn(4, 3)
y5 = torch.randn(5, 3)

BAD = [
    # (kwargs for contrastive_loss, exception, words the message must contain)
    (dict(x=[[1.0]], y=y4), TypeError, "x"),
    (dict(x=x4, y=y4.numpy()), TypeError, "y"),
    (dict(x=x4.long(), y=y4), TypeError, "x"),
    (dict(x=x4, y=y4.double()), TypeError, "dtype"),
    (dict(x=torch.randn(3), y=y4), ValueError, "x"),
    (dict(x=torch.randn(1, 1, 4, 3), y=y4), ValueError, "x"),
    (dict(x=torch.randn(2, 4, 3), y=y4), ValueError, "head axis"),
    (dict(x=torch.randn(2, 4, 3), y=torch.randn(3, 4, 3)), ValueError, "heads"),
    (dict(x=x4, y=torch.randn(4, 2)), ValueError, "D"),
    (dict(x=x4, y=y5), ValueError, "symmetric"),
    (dict(x=x4, y=y5, symmetric=False), ValueError, "targets"),
    (dict(x=x4, y=y4, targets=torch.arange(4)), ValueError, "targets"),
    (dict(x=x4, y=y5, symmetric=False, targets=torch.tensor([0, 1, 2, 5])), ValueError, "targets"),
    (dict(x=x4, y=y5, symmetric=False, targets=torch.tensor([0, 1, -1, 2])), ValueError, "targets"),
    (dict(x=x4, y=y5, symmetric=False, targets=torch.arange(3)), ValueError, "targets"),
    (dict(x=x4, y=y5, symmetric=False, targets=torch.zeros(4)), TypeError, "targets"),
    (dict(x=x4, y=y5, symmetric=False, targets=[0, 1, 2, 3]), TypeError, "targets"),
    (dict(x=x4, y=y4, temperature=0.0), ValueError, "temperature"),
    (dict(x=x4, y=y4, temperature=-0.1), ValueError, "temperature"),
    (dict(x=x4, y=y4, temperature=float("nan")), ValueError, "temperature"),
    (dict(x=x4, y=y4, temperature=float("inf")), ValueError, "temperature"),
    (dict(x=x4, y=y4, temperature=torch.tensor([0.1, 0.2, 0.0, 0.1])), ValueError, "temperature"),
    (dict(x=x4, y=y4, temperature=torch.tensor([0.1, 0.2, 0.3])), ValueError, "temperature"),
    (dict(x=x4, y=y4, temperature=torch.full((2, 4), 0.1)), ValueError, "temperature"),
    (dict(x=x4, y=y4, temperature=torch.tensor([1, 2, 3, 4])), TypeError, "temperature"),
    (dict(x=x4, y=y4, temperature="0.07"), TypeError, "temperature"),
    (dict(x=x4, y=y4, temperature=True), TypeError, "temperature"),
    (dict(x=x4, y=y4, loss="max_margin", margin=float("nan")), ValueError, "margin"),
    (dict(x=x4, y=y4, loss="max_margin", margin=torch.full((3,), 0.2)), ValueError, "margin"),
    (dict(x=x4, y=y4, loss="max_margin", margin=torch.tensor([0.2, float("inf"), 0.2, 0.2])), ValueError, "margin"),
    (dict(x=x4, y=y4, loss="max_margin", margin=mk.DySTreSS()), TypeError, "margin"),
    (dict(x=torch.randn(1, 3), y=torch.randn(1, 3)), ValueError, "negative"),
    (dict(x=torch.randn(3, 3), y=torch.randn(1, 3), symmetric=False, targets=torch.zeros(3, dtype=torch.long)),
     ValueError, "negative"),
    (dict(x=x4, y=y4, loss="triplet"), ValueError, "loss"),
    (dict(x=x4, y=y4, loss=None), TypeError, "loss"),
    (dict(x=x4, y=y4, reduction="avg"), ValueError, "reduction"),
    (dict(x=x4, y=y4, backend="cuda"), ValueError, "backend"),
    (dict(x=x4, y=y4, hardest_negative=True), ValueError, "hardest_negative"),
    (dict(x=x4, y=y4, symmetric="yes"), TypeError, "symmetric"),
    (dict(x=x4, y=y4, deterministic=1), TypeError, "deterministic"),
    (dict(x=torch.randn(4, 0), y=torch.randn(4, 0)), ValueError, "x"),
    (dict(x=x4, y=y4, normalize="no"), TypeError, "normalize"),
    (dict(x=x4, y=y4, temperature=1e-50), ValueError, "temperature"),  # > 0 in fp64, 0 in fp32
    (dict(x=x4, y=y4, temperature=torch.full((4,), 1e-50, dtype=torch.float64)), ValueError, "temperature"),
    (dict(x=x4, y=y4, temperature=1e300), ValueError, "temperature"),  # finite in fp64, inf in fp32
    (dict(x=x4, y=y4, loss="max_margin", margin=1e300), ValueError, "margin"),
]


@pytest.mark.parametrize("kwargs,exc,words", BAD, ids=[f"{i}-{w}" for i, (_, _, w) in enumerate(BAD)])
def test_bad_input_raises_naming_the_argument(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        mk.contrastive_loss(**kwargs)


@pytest.mark.parametrize("call,name", [
    (lambda: mk.info_nce(x4, y4, margin=5.0), "margin"),
    (lambda: mk.info_nce(x4, y4, margin=torch.full((4,), 0.2)), "margin"),
    (lambda: mk.max_margin(x4, y4, temperature=0.1), "temperature"),
    (lambda: mk.max_margin(x4, y4, 0.2, temperature=mk.DySTreSS()), "temperature"),
])
def test_an_argument_the_loss_does_not_use_is_refused(call, name):
    """info_nce has no margin and max_margin no temperature: passing one is a mistake, not something to ignore."""
    with pytest.raises(ValueError, match=f"^{name}: .* does not use"):
        call()


def test_check_finite_raises_on_nan_and_inf():
    bad = x4.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="x"):
        mk.info_nce(bad, y4, check_finite=True)
    bad_y = y4.clone()
    bad_y[1, 1] = float("inf")
    with pytest.raises(ValueError, match="y"):
        mk.info_nce(x4, bad_y, check_finite=True)
    assert torch.isfinite(mk.info_nce(x4, y4, check_finite=True))


def test_dystress_arguments():
    with pytest.raises(ValueError, match="tau_min"):
        mk.DySTreSS(0.0, 0.2)
    with pytest.raises(ValueError, match="tau_max"):
        mk.DySTreSS(0.2, 0.1)
    with pytest.raises(TypeError, match="tau_max"):
        mk.DySTreSS(0.1, "0.2")


def test_available_backends_reports_every_backend():
    reasons = mk.available_backends()
    assert set(reasons) == {"torch", "triton", "cpp"} and reasons["torch"] is None
    for reason in reasons.values():
        assert reason is None or isinstance(reason, str) and reason


def make_unavailable(monkeypatch, name: str, reason: str) -> None:
    """Backend ``name`` reports ``reason`` on every device, as it would without its compiler, GPU or package."""
    monkeypatch.setattr(backends._LOADED[name], "unavailable_reason", lambda device=None: reason)


@pytest.mark.parametrize("name", ["cpp", "triton"])
def test_unavailable_backend_says_why(monkeypatch, name):
    make_unavailable(monkeypatch, name, "simulated: its toolchain is missing")
    assert mk.available_backends()[name] == "simulated: its toolchain is missing"
    with pytest.raises(ValueError, match=f"backend='{name}'.*simulated: its toolchain is missing"):
        mk.info_nce(x4, y4, backend=name)


def test_auto_falls_back_to_torch_when_cpp_cannot_run(monkeypatch):
    make_unavailable(monkeypatch, "cpp", "simulated: no C++ compiler")
    assert backends.resolve("auto", torch.device("cpu")).__name__ == "mmts_kernels.reference"
    torch.testing.assert_close(mk.info_nce(x4, y4), mk.info_nce(x4, y4, backend="torch"), rtol=0, atol=0)


def test_auto_uses_cpp_on_the_cpu_when_it_runs():
    expected = "mmts_kernels.cpp_backend" if mk.available_backends()["cpp"] is None else "mmts_kernels.reference"
    assert backends.resolve("auto", torch.device("cpu")).__name__ == expected


def test_auto_uses_triton_for_cuda_tensors_and_refuses_without_it(monkeypatch):
    """The choice for CUDA tensors, decided without a GPU: triton when it runs, else torch."""
    monkeypatch.setattr(backends._LOADED["triton"], "unavailable_reason", lambda device=None: None)
    assert backends.resolve("auto", torch.device("cuda")).__name__ == "mmts_kernels.triton_backend"
    make_unavailable(monkeypatch, "triton", "simulated: triton is not installed")
    assert backends.resolve("auto", torch.device("cuda")).__name__ == "mmts_kernels.reference"


def test_mixed_devices_without_a_gpu():
    """The device checks run on shapes and devices only, so the "meta" device exercises them on any machine."""
    meta4 = torch.empty(4, 3, device="meta")
    with pytest.raises(ValueError, match="same device"):
        mk.info_nce(x4, meta4)
    with pytest.raises(ValueError, match="temperature.*device"):
        mk.info_nce(meta4, meta4, torch.full((4,), 0.1))
    with pytest.raises(ValueError, match="margin.*device"):
        mk.max_margin(meta4, meta4, torch.full((4,), 0.1))
    with pytest.raises(ValueError, match="targets.*device"):
        mk.info_nce(meta4, meta4, symmetric=False, targets=torch.arange(4))


@requires_cuda
def test_mixed_devices():
    with pytest.raises(ValueError, match="device"):
        mk.info_nce(x4, y4.cuda())
    with pytest.raises(ValueError, match="temperature"):
        mk.info_nce(x4.cuda(), y4.cuda(), torch.full((4,), 0.1))


@pytest.mark.parametrize("enabled", [False, True])
def test_deterministic_none_follows_torch_setting(monkeypatch, enabled):
    """deterministic=None asks the backend for what torch.are_deterministic_algorithms_enabled() says; an explicit
    value wins over it."""
    from mmts_kernels import reference

    seen = []
    real = reference.compute_stats

    def spy(x, y, tau, margin, targets, request, **kw):
        seen.append(request.deterministic)
        return real(x, y, tau, margin, targets, request, **kw)

    monkeypatch.setattr(reference, "compute_stats", spy)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        mk.info_nce(x4, y4, backend="torch")
        mk.info_nce(x4, y4, backend="torch", deterministic=not enabled)
    finally:
        torch.use_deterministic_algorithms(before)
    assert seen == [enabled, not enabled]


def test_validation_runs_before_any_backend(monkeypatch):
    """A bad argument never reaches a backend: compute_stats is not called."""
    from mmts_kernels import reference

    calls = []
    monkeypatch.setattr(reference, "compute_stats", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError):
        mk.info_nce(x4, y4, temperature=-1.0, backend="torch")
    assert not calls
