"""The torch reference against independent formulations, in float64, values and gradients.

InfoNCE: F.cross_entropy on per-row-scaled logits (row i of S by 1/τ_i; column j, i.e. row j of Sᵀ, by 1/τ_j).
Max-margin and hardest negative: explicit Python loops. DySTreSS: the §5 formula written out per element.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import mmts_kernels as mk
from mmts_kernels.temperature import MAX_TEMPERATURE
from support import (Case, cases, check_backend_against_reference, gradcheck_loss, loss_and_grads, make_inputs,
                     rel_err, with_dtype)

# Relative tolerance of the float64 comparisons, ‖out − ref‖/‖ref‖, values and every gradient.
F64_TOL = 1e-12


# ---------------------------------------------------------------------------------------------------------------
# Independent formulations of every loss (single head; heads are summed).

def infonce_ce(x, y, tau, targets, symmetric, dystress=None, reduction="mean"):
    S = x @ y.T
    if dystress is not None:
        s = S.detach()
        tau_mat = dystress.tau_min + 0.5 * (dystress.tau_max - dystress.tau_min) * (1 + torch.cos(math.pi * (1 + s)))
        row_logits, col_logits = S / tau_mat, (S / tau_mat).T
    else:
        tau = tau.expand(x.shape[0]) if tau.dim() == 0 else tau
        row_logits = S / tau[:, None]
        col_logits = S.T / tau[:, None] if symmetric else None
    row = F.cross_entropy(row_logits, targets, reduction="none")
    if not symmetric:
        return _reduce(row, reduction, row.numel())
    col = F.cross_entropy(col_logits, targets, reduction="none")
    if reduction == "mean":
        return 0.5 * (row.mean() + col.mean())
    return _reduce(torch.stack((row, col)), reduction, None)


def max_margin_loops(x, y, margin, targets, symmetric, hardest, reduction="mean"):
    S = x @ y.T
    N, M = S.shape
    m = margin.expand(N) if margin.dim() == 0 else margin
    rows, cols = [], []
    for i in range(N):
        t = int(targets[i])
        viol = [m[i] + S[i, j] - S[i, t] for j in range(M) if j != t]
        rows.append(torch.relu(torch.stack(viol).max()) if hardest else sum(torch.relu(v) for v in viol))
    if symmetric:
        for j in range(N):
            viol = [m[j] + S[i, j] - S[j, j] for i in range(N) if i != j]
            cols.append(torch.relu(torch.stack(viol).max()) if hardest else sum(torch.relu(v) for v in viol))
    terms = torch.stack((torch.stack(rows), torch.stack(cols))) if symmetric else torch.stack(rows)
    count = terms.numel() if hardest else terms.numel() * (M - 1)
    return _reduce(terms, reduction, count)


def _reduce(terms, reduction, count):
    if reduction == "none":
        return terms
    return terms.sum() / (count if reduction == "mean" else 1)


def independent_loss(x, y, **kw):
    """Dispatch to the independent formulation; heads looped and summed ("none" keeps the head axis)."""
    if x.dim() == 3:
        per_head = [independent_loss(xh, yh, **kw) for xh, yh in zip(x, y)]
        return torch.stack(per_head) if kw.get("reduction") == "none" else sum(per_head)
    N = x.shape[0]
    targets = kw.get("targets")
    targets = torch.arange(N) if targets is None else targets
    reduction, symmetric = kw["reduction"], kw["symmetric"]
    if kw["loss"] == "infonce":
        tau = kw["temperature"]
        if isinstance(tau, mk.DySTreSS):
            return infonce_ce(x, y, None, targets, symmetric, dystress=tau, reduction=reduction)
        tau = torch.as_tensor(tau, dtype=x.dtype)
        return infonce_ce(x, y, tau, targets, symmetric, reduction=reduction)
    margin = torch.as_tensor(kw["margin"], dtype=x.dtype)
    return max_margin_loops(x, y, margin, targets, symmetric, kw["hardest_negative"], reduction)


def assert_matches_independent(case: Case):
    inp = make_inputs(case, torch.float64)
    out, grads = loss_and_grads(inp, backend="torch")
    ind_out, ind_grads = loss_and_grads(inp, loss_fn=lambda x, y, **kw: independent_loss(x, y, **kw))
    for name, a, b in [("loss", out, ind_out)] + [(k, grads[k], ind_grads[k]) for k in grads]:
        assert a.shape == b.shape, (name, a.shape, b.shape)
        err = rel_err(a, b)
        assert err <= F64_TOL, f"{name}: rel err {err:.3e} on {case}"


# ---------------------------------------------------------------------------------------------------------------

@given(cases(max_n=64, max_d=64))
def test_reference_matches_independent_formulations(case):
    assert_matches_independent(with_dtype(case, torch.float64))


@pytest.mark.parametrize("loss,hardest", [("infonce", False), ("max_margin", False), ("max_margin", True)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_loss_and_reduction(loss, hardest, symmetric, reduction):
    for mode in ("per_sample", "learnable_per_sample", "learnable_scalar", "dystress"):
        case = Case(N=7, M=7 if symmetric else 5, D=3, loss=loss, hardest_negative=hardest, symmetric=symmetric,
                    reduction=reduction, temperature_mode=mode, margin_mode="learnable_per_sample", seed=11)
        assert_matches_independent(with_dtype(case, torch.float64))


def test_mmts_semantics_column_uses_its_own_temperature():
    """Column j of the symmetric loss is scaled by τ_j, as the official MM-TS code does (logit_scale.unsqueeze(1)
    applied to y @ xᵀ), not by the row temperatures."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    tau = torch.linspace(0.05, 0.5, 6, dtype=torch.float64)
    scale = (1 / tau).unsqueeze(1)
    logits_per_x, logits_per_y = scale * (x @ y.T), scale * (y @ x.T)
    labels = torch.arange(6)
    official = 0.5 * (F.cross_entropy(logits_per_x, labels) + F.cross_entropy(logits_per_y, labels))
    torch.testing.assert_close(mk.info_nce(x, y, tau, backend="torch"), official, rtol=1e-13, atol=0)


def test_max_margin_matches_avion_formulation():
    """The all-negatives normalization Σ / 2N(N−1) of the AVION/LaViLa MaxMarginRankingLoss (fix_norm=True)."""
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    S, n, m = x @ y.T, 5, 0.2
    keep = ~torch.eye(n, dtype=torch.bool)
    diag = S.diag()
    row = torch.relu(m - (diag[:, None] - S))[keep]  # anchor i (row), negative S_ij
    col = torch.relu(m - (diag[:, None] - S.T))[keep]  # anchor i (column), negative S_ji
    torch.testing.assert_close(mk.max_margin(x, y, m, backend="torch"), torch.cat((row, col)).mean(),
                               rtol=1e-13, atol=0)


@pytest.mark.parametrize("loss,hardest", [("infonce", False), ("max_margin", False), ("max_margin", True)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gradcheck(loss, hardest, symmetric):
    assert gradcheck_loss("torch", loss, hardest, symmetric)


def test_gradcheck_learnable_scalar_temperature():
    # DySTreSS is not gradchecked: its τ is a *detached* function of S (as in the official code), so finite
    # differences see a dependency the analytic gradient leaves out by design; test_every_loss_and_reduction
    # checks its gradient against the §5 formula with the same detach.
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    log_tau = torch.tensor(math.log(0.2), dtype=torch.float64, requires_grad=True)  # open_clip-style learnable
    assert torch.autograd.gradcheck(lambda x, y, t: mk.info_nce(x, y, t.exp(), backend="torch"), (x, y, log_tau))


def test_temperature_gradient_closed_form():
    """∂L/∂τ_i for one-directional InfoNCE equals (pos_i − ws_i)/τ_i² per row (DESIGN §3), summed for mean/N."""
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    tau = (0.1 + torch.rand(6, generator=g, dtype=torch.float64)).requires_grad_()
    mk.info_nce(x, y, tau, symmetric=False, targets=torch.arange(6), reduction="sum", backend="torch").backward()
    S = x @ y.T
    p = torch.softmax(S / tau.detach()[:, None], dim=1)
    ws = (p * S).sum(1)
    torch.testing.assert_close(tau.grad, (S.diag() - ws) / tau.detach() ** 2, rtol=1e-12, atol=0)


@given(cases(max_n=32, max_d=64, dtypes=(torch.float32, torch.bfloat16, torch.float16)))
def test_reference_low_precision_inputs_compute_in_fp32(case):
    """bf16/fp16/fp32 inputs: the reference computes in fp32 (loss dtype fp32) and meets the §6 bar."""
    check_backend_against_reference(case, "torch")


def test_heads_are_independent_and_summed():
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(3, 5, 4, generator=g, dtype=torch.float64), torch.randn(3, 5, 4, generator=g,
                                                                               dtype=torch.float64)
    tau = torch.rand(3, 5, generator=g, dtype=torch.float64) + 0.1  # [H, N]: one temperature per head and sample
    total = mk.info_nce(x, y, tau, backend="torch")
    torch.testing.assert_close(total, sum(mk.info_nce(x[h], y[h], tau[h], backend="torch") for h in range(3)),
                               rtol=1e-13, atol=0)
    assert mk.info_nce(x, y, tau, reduction="none", backend="torch").shape == (3, 2, 5)


@pytest.mark.parametrize("make", [
    lambda x, y: (x.T.contiguous().T, y.T.contiguous().T),  # column-major
    lambda x, y: (torch.stack([x, -x], 2).flatten(1)[:, ::2], torch.stack([y, -y], 2).flatten(1)[:, ::2]),
    lambda x, y: (x.unsqueeze(0).expand(2, -1, -1)[1], y.unsqueeze(0).expand(2, -1, -1)[1]),  # expanded views
])
def test_non_contiguous_inputs(make):
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    xs, ys = make(x, y)
    for loss in ("infonce", "max_margin"):
        torch.testing.assert_close(mk.contrastive_loss(xs, ys, loss=loss, backend="torch"),
                                   mk.contrastive_loss(x, y, loss=loss, backend="torch"), rtol=1e-14, atol=0)


@pytest.mark.parametrize("N,D", [(2, 1), (2, 5), (9, 1)])
def test_small_shapes(N, D):
    case = Case(N=N, M=N, D=D, temperature_mode="learnable_per_sample", seed=N * 10 + D)
    for loss, hardest in (("infonce", False), ("max_margin", False), ("max_margin", True)):
        assert_matches_independent(Case(**{**case.__dict__, "loss": loss, "hardest_negative": hardest,
                                           "dtype": torch.float64}))


@given(st.floats(1e-3, MAX_TEMPERATURE), st.integers(0, 2**20))
def test_extreme_temperatures_stay_finite(tau, seed):
    """No fixed shift: unnormalized inputs with τ down to 1e-3 give a finite loss (online max in the lse)."""
    g = torch.Generator().manual_seed(seed)
    x, y = 10 * torch.randn(8, 4, generator=g), 10 * torch.randn(8, 4, generator=g)
    assert torch.isfinite(mk.info_nce(x, y, tau, backend="torch"))


def test_nan_propagates_without_check_finite():
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    x[1, 2] = float("nan")
    assert torch.isnan(mk.info_nce(x, y, backend="torch"))


def test_normalize_is_differentiable_l2():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    a = mk.info_nce(x, y, normalize=True, backend="torch")
    b = mk.info_nce(F.normalize(x, dim=1), F.normalize(y, dim=1), backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
    assert torch.autograd.gradcheck(lambda x, y: mk.info_nce(x, y, normalize=True, backend="torch"), (x, y))


def test_loss_dtype_is_fp32_for_low_precision():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, y = torch.randn(4, 3).to(dtype), torch.randn(4, 3).to(dtype)
        assert mk.info_nce(x, y, backend="torch").dtype == torch.float32
    assert mk.info_nce(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64),
                       backend="torch").dtype == torch.float64
