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


def test_unavailable_backend_says_why():
    reasons = mk.available_backends()
    assert set(reasons) == {"torch", "triton", "cpp"} and reasons["torch"] is None
    for name, reason in reasons.items():
        assert reason is None or isinstance(reason, str) and reason
        if reasons[name] is not None:
            with pytest.raises(ValueError, match=name):
                mk.info_nce(x4, y4, backend=name)


def test_auto_falls_back_to_a_backend_that_runs_here():
    chosen = backends.resolve("auto", x4.device)
    assert chosen.unavailable_reason(x4.device) is None
    assert torch.isfinite(mk.info_nce(x4, y4))


@requires_cuda
def test_mixed_devices():
    with pytest.raises(ValueError, match="device"):
        mk.info_nce(x4, y4.cuda())
    with pytest.raises(ValueError, match="temperature"):
        mk.info_nce(x4.cuda(), y4.cuda(), torch.full((4,), 0.1))


def test_validation_runs_before_any_backend(monkeypatch):
    """A bad argument never reaches a backend: compute_stats is not called."""
    from mmts_kernels import reference

    calls = []
    monkeypatch.setattr(reference, "compute_stats", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError):
        mk.info_nce(x4, y4, temperature=-1.0, backend="torch")
    assert not calls
