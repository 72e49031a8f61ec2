"""SigLIP's sigmoid loss (issue 18 item 1): ``mk.sigmoid_loss``, ``contrastive_loss(loss="sigmoid")`` and
``mk.SigmoidLoss`` on every backend, against a float64 formula written from the paper, independently of the
library (no ``mmts_kernels`` code):

    L = −(1/N) Σ_i Σ_j log σ(z_ij (S_ij/τ_i + b_i)),   S = x yᵀ,   z_ij = +1 for row i's positive, −1 otherwise

with labels: same_label="positive" makes every same-label column a positive, "ignore" drops the same-label columns
other than the target from the sum. Values and every gradient (x, y, τ, b) to 1e-9 relative in float64 on
``torch``, ``cpp`` and ``triton`` (under the interpreter on the CPU); fp32 on ``cpp`` to 1e-5.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mmts_kernels as mk
import support
from support import assert_matches_formula, backend_marker, rel_err

BACKENDS = [pytest.param(name, marks=backend_marker(name)) for name in ("torch", "cpp", "triton")]
VALUE_MODES = ("float", "scalar_tensor", "per_row", "learnable_per_row", "learnable_scalar", "learnable_heads")


def sigmoid_formula(x, y, tau, bias, targets, labels_x=None, labels_y=None, same_label=None) -> torch.Tensor:
    """Per-row losses [N] of one head: Σ_j −log σ(z_ij (S_ij/τ_i + b_i)) over the columns that count."""
    N, M = x.shape[0], y.shape[0]
    S = x @ y.T
    positive = torch.zeros(N, M, dtype=torch.bool)
    positive[torch.arange(N), targets] = True
    counted = torch.ones(N, M, dtype=torch.bool)
    if labels_x is not None:
        same = labels_x[:, None] == labels_y[None, :]
        if same_label == "positive":
            positive = positive | same
        else:  # "ignore"
            counted = ~(same & ~positive)
    z = positive.double() * 2 - 1
    logits = S / tau[:, None] + bias[:, None]
    return torch.where(counted, -F.logsigmoid(z * logits), 0.0).sum(1)


@dataclass(frozen=True)
class Case:
    N: int
    M: int
    D: int
    H: Optional[int] = None
    tau_mode: str = "per_row"
    bias_mode: str = "per_row"
    reduction: str = "mean"
    same_label: Optional[str] = None
    classes: int = 3
    seed: int = 0


@st.composite
def cases(draw, max_n: int = 11, max_d: int = 6) -> Case:
    N = draw(st.integers(1, max_n))
    square = draw(st.booleans())
    return Case(N=N, M=N if square else draw(st.integers(1, max_n)), D=draw(st.integers(1, max_d)),
                H=draw(st.sampled_from((None, 1, 2))), tau_mode=draw(st.sampled_from(VALUE_MODES)),
                bias_mode=draw(st.sampled_from(VALUE_MODES)), reduction=draw(st.sampled_from(("mean", "sum", "none"))),
                same_label=draw(st.sampled_from((None, "positive", "ignore"))), classes=draw(st.integers(1, 12)),
                seed=draw(st.integers(0, 2**31 - 1)))


def make_inputs(case: Case, dtype=torch.float64, device="cpu"):
    """(kwargs for the library, the formula's per-head τ [H, N] and b [H, N], leaves, upstream); every random value
    is drawn in float64 first, so every dtype sees the same values."""
    g = torch.Generator().manual_seed(case.seed)
    H = case.H or 1
    lead = () if case.H is None else (case.H,)
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    x = (torch.randn(*lead, case.N, case.D, generator=g, dtype=torch.float64) / case.D ** 0.5).to(dtype).to(device)
    y = (torch.randn(*lead, case.M, case.D, generator=g, dtype=torch.float64) / case.D ** 0.5).to(dtype).to(device)
    leaves = {"x": x.requires_grad_(), "y": y.requires_grad_()}

    def value(mode, name, lo, hi):
        shape = {"float": (), "scalar_tensor": (), "learnable_scalar": (), "per_row": (case.N,),
                 "learnable_per_row": (case.N,), "learnable_heads": (H, case.N)}[mode]
        v = lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)
        if mode == "float":
            return float(v), torch.full((H, case.N), float(v), dtype=torch.float64)
        v = v.to(pdt).to(device)
        if mode.startswith("learnable"):
            leaves[name] = v.requires_grad_()
        return v, v.expand(H, case.N)

    tau, tau_hn = value(case.tau_mode, "temperature", 0.05, 1.0)
    bias, bias_hn = value(case.bias_mode, "bias", -6.0, 2.0)
    targets = None if case.N == case.M else torch.randint(0, case.M, (case.N,), generator=g).to(device)
    kwargs = dict(temperature=tau, bias=bias, targets=targets, reduction=case.reduction)
    labels = None
    if case.same_label is not None:
        ly = torch.randint(0, case.classes, (case.M,), generator=g)
        lx = ly if targets is None else ly[targets.cpu()]
        labels = (lx, ly)
        kwargs.update(labels=lx.to(device) if targets is None else (lx.to(device), ly.to(device)),
                      same_label=case.same_label)
    shape = (((case.H,) if case.H else ()) + (case.N,)) if case.reduction == "none" else ()
    upstream = (0.5 + torch.rand(shape, generator=g, dtype=torch.float64)).to(device)
    return kwargs, tau_hn, bias_hn, labels, leaves, upstream


def formula_loss(case: Case, x, y, tau_hn, bias_hn, labels, targets):
    x3, y3 = (x, y) if case.H else (x.unsqueeze(0), y.unsqueeze(0))
    targets = torch.arange(case.N) if targets is None else targets
    lx, ly = labels if labels is not None else (None, None)
    per_row = torch.stack([sigmoid_formula(x3[h].double(), y3[h].double(), tau_hn[h].double(), bias_hn[h].double(),
                                           targets, lx, ly, case.same_label) for h in range(x3.shape[0])])  # [H, N]
    if case.reduction == "none":
        return per_row if case.H else per_row.squeeze(0)
    if case.reduction == "sum":
        return per_row.sum()
    return (per_row.sum(1) / case.N).sum()


def run(case: Case, backend: str, dtype=torch.float64):
    device = support.test_device(backend)
    kwargs, tau_hn, bias_hn, labels, leaves, upstream = make_inputs(case, dtype, device)
    out = mk.sigmoid_loss(leaves["x"], leaves["y"], backend=backend, **kwargs)
    grads = torch.autograd.grad((out.double() * upstream).sum(), list(leaves.values()))
    return out, dict(zip(leaves, grads))


def reference(case: Case):
    kwargs, tau_hn, bias_hn, labels, leaves, upstream = make_inputs(case, torch.float64)
    out = formula_loss(case, leaves["x"], leaves["y"], tau_hn, bias_hn, labels, kwargs["targets"])
    grads = torch.autograd.grad((out * upstream).sum(), list(leaves.values()))
    return out, dict(zip(leaves, grads))


def check_case(case: Case, backend: str, dtype=torch.float64, tol: float = 1e-9) -> None:
    ref_out, ref_grads = reference(case)
    out, grads = run(case, backend, dtype)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_matches_formula(backend, out, grads, ref_out, ref_grads, tol, case)


# ---------------------------------------------------------------------------------------------------------------
# Values and gradients against the formula.

@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=15)
@given(case=cases())
def test_matches_the_formula_float64(backend, case):
    check_case(case, backend)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] == "cpp"])
@settings(max_examples=8)
@given(case=cases(max_n=40, max_d=24))
def test_cpp_float32_close_to_the_formula(backend, case):
    check_case(case, backend, torch.float32, tol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_big_class_and_singletons(backend):
    """Labels at both extremes: one class (every pair positive under "positive", nothing but the target left under
    "ignore") and all singletons (the labels change nothing)."""
    for same_label in ("positive", "ignore"):
        for classes in (1, 64):
            check_case(Case(N=9, M=9, D=3, same_label=same_label, classes=classes, seed=classes), backend)


def test_singleton_labels_change_nothing():
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    plain = mk.sigmoid_loss(x, y, 0.2, -3.0, backend="torch")
    for same_label in ("positive", "ignore"):
        labelled = mk.sigmoid_loss(x, y, 0.2, -3.0, labels=torch.arange(7), same_label=same_label, backend="torch")
        torch.testing.assert_close(labelled, plain, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_contrastive_loss_sigmoid_is_sigmoid_loss(backend):
    device = support.test_device(backend)
    g = torch.Generator().manual_seed(5)
    x, y = (torch.randn(6, 4, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    tau = (0.1 + torch.rand(6, generator=g, dtype=torch.float64)).to(device)
    a = mk.contrastive_loss(x, y, loss="sigmoid", temperature=tau, bias=-4.0, backend=backend)
    b = mk.sigmoid_loss(x, y, tau, -4.0, backend=backend)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    default = mk.contrastive_loss(x, y, loss="sigmoid", temperature=tau, backend=backend)  # bias −10
    torch.testing.assert_close(default, mk.sigmoid_loss(x, y, tau, -10.0, backend=backend), rtol=0, atol=0)


def test_large_logits_stay_finite_in_float32():
    """open_clip's logit_scale is clamped at 100 (τ = 0.01): |u| reaches ~110 on unit vectors."""
    g = torch.Generator().manual_seed(2)
    x = F.normalize(torch.randn(16, 8, generator=g), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(16, 8, generator=g), dim=-1)
    for backend in ("torch",) + tuple(b for b in ("cpp",) if mk.available_backends()[b] is None):
        out = mk.sigmoid_loss(x, y, 0.01, -10.0, backend=backend)
        (gx,) = torch.autograd.grad(out, x)
        ref = sigmoid_formula(x.double(), y.double(), torch.full((16,), 0.01, dtype=torch.float64),
                              torch.full((16,), -10.0, dtype=torch.float64), torch.arange(16)).sum() / 16
        assert torch.isfinite(out) and torch.isfinite(gx).all()
        assert rel_err(out, ref) <= 1e-5, backend


# ---------------------------------------------------------------------------------------------------------------
# The module.

def test_sigmoid_module_is_open_clips_parameterization():
    loss = mk.SigmoidLoss(backend="torch")
    assert math.isclose(loss.logit_scale.item(), math.log(10), rel_tol=1e-7) and loss.logit_bias.item() == -10.0
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    out = loss(x, y)
    torch.testing.assert_close(out, mk.sigmoid_loss(x, y, 0.1, -10.0, backend="torch"))
    out.backward()
    # ∂L/∂logit_bias = −(1/N) Σ z σ(−z u), ∂L/∂logit_scale = −(1/N) Σ z σ(−z u) S / τ  (u = S/τ + b, 1/τ = e^scale)
    S, z = x @ y.T, torch.eye(5) * 2 - 1
    u = S * 10 - 10
    w = -z * torch.sigmoid(-z * u)
    torch.testing.assert_close(loss.logit_bias.grad, w.sum() / 5)
    torch.testing.assert_close(loss.logit_scale.grad, (w * S * 10).sum() / 5)


def test_sigmoid_module_clamps_the_scale_and_fixed_values():
    loss = mk.SigmoidLoss(backend="torch")
    with torch.no_grad():
        loss.logit_scale.fill_(10.0)
    loss(torch.randn(4, 3), torch.randn(4, 3))
    assert math.isclose(loss.logit_scale.item(), math.log(100), rel_tol=1e-7)
    fixed = mk.SigmoidLoss(torch.full((4,), 0.2), torch.zeros(4), learnable=False, backend="torch")
    assert not list(fixed.parameters())
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(fixed(x, y), mk.sigmoid_loss(x, y, 0.2, 0.0, backend="torch"))
    with pytest.raises(ValueError, match="temperature"):
        mk.SigmoidLoss(temperature=2.0)
    with pytest.raises(ValueError, match="bias"):
        mk.SigmoidLoss(bias=float("nan"))


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a ValueError / TypeError naming the argument, before any backend runs.

@pytest.mark.parametrize("call, error, match", [
    (lambda x, y: mk.sigmoid_loss(x, y, 0.1, torch.zeros(3)), ValueError, "bias"),
    (lambda x, y: mk.sigmoid_loss(x, y, 0.1, torch.zeros(5, dtype=torch.int64)), TypeError, "bias"),
    (lambda x, y: mk.sigmoid_loss(x, y, 0.1, float("inf")), ValueError, "bias"),
    (lambda x, y: mk.sigmoid_loss(x, y, 0.1, "b"), TypeError, "bias"),
    (lambda x, y: mk.sigmoid_loss(x, y, mk.DySTreSS(0.1, 0.5)), ValueError, "temperature"),
    (lambda x, y: mk.sigmoid_loss(x, y, 10.0), ValueError, "logit_scale"),
    (lambda x, y: mk.sigmoid_loss(x, y, -0.1), ValueError, "temperature"),
    (lambda x, y: mk.info_nce(x, y, bias=1.0), ValueError, "bias"),
    (lambda x, y: mk.contrastive_loss(x, y, loss="max_margin", bias=1.0), ValueError, "bias"),
    (lambda x, y: mk.contrastive_loss(x, y, loss="sigmod"), ValueError, "loss"),
    (lambda x, y: mk.sigmoid_loss(x, y, labels=torch.zeros(4, dtype=torch.int64)), ValueError, "labels"),
    (lambda x, y: mk.sigmoid_loss(x, y, labels=torch.zeros(5)), TypeError, "labels"),
    (lambda x, y: mk.sigmoid_loss(x, y, labels=torch.zeros(5, dtype=torch.int64), same_label="both"), ValueError,
     "same_label"),
    (lambda x, y: mk.sigmoid_loss(x, y[:3], targets=torch.tensor([0, 1, 2, 0, 1]),
                                  labels=torch.zeros(5, dtype=torch.int64)), ValueError, "labels"),
    (lambda x, y: mk.sigmoid_loss(x, y, reduction="avg"), ValueError, "reduction"),
])
def test_bad_input(call, error, match):
    x, y = torch.randn(5, 3), torch.randn(5, 3)
    with pytest.raises(error, match=match):
        call(x, y)


def test_sigmoid_does_not_need_negatives():
    """One pair is a valid sigmoid loss (a positive only), unlike InfoNCE; it equals −log σ(S/τ + b)."""
    x, y = torch.randn(1, 3, dtype=torch.float64), torch.randn(1, 3, dtype=torch.float64)
    out = mk.sigmoid_loss(x, y, 0.5, 1.0, backend="torch")
    torch.testing.assert_close(out, -F.logsigmoid((x @ y.T).squeeze() / 0.5 + 1.0))
