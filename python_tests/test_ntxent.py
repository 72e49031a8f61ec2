"""SimCLR's NT-Xent, DCL (decoupled=True) and DySTreSS with detach=False, on every backend (issue 17 item 1).

Every backend is checked against ``ntxent_formula``: a float64 re-implementation written from the paper's formula,
independently of the library (no ``mmts_kernels`` code): with Z = cat(z1, z2), S = Z Zᵀ and p(a) = a ± B,

    L_a = −S_{a,p(a)}/τ_{a,p(a)} + log Σ_{j ≠ a} exp(S_aj/τ_aj)          (decoupled: Σ over j ∉ {a, p(a)})

the non-decoupled loss as ``F.cross_entropy`` on the logits with their diagonal masked (what TS / lightly run), the
decoupled one as a loop over anchors. Values and every gradient (z1, z2, τ) must agree to 1e-9 relative in
float64 on ``torch``, ``cpp`` and ``triton`` (under the interpreter on the CPU); fp32 on ``cpp`` to 1e-5.
"""
from __future__ import annotations

import datetime
import math
import os
import traceback
from dataclasses import dataclass, replace
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mmts_kernels as mk
import support
from support import backend_marker, rel_err

BACKENDS = [pytest.param(name, marks=backend_marker(name)) for name in ("torch", "cpp", "triton")]
TEMPERATURE_MODES = ("float", "scalar_tensor", "per_sample", "per_anchor", "learnable_per_sample",
                     "learnable_per_anchor", "learnable_heads", "dystress", "dystress_grad")


# ---------------------------------------------------------------------------------------------------------------
# The formula, from the math (float64, materialized; nothing from mmts_kernels).

def _dystress_tau(s: torch.Tensor, tau_min: float, tau_max: float) -> torch.Tensor:
    return tau_min + 0.5 * (tau_max - tau_min) * (1.0 + torch.cos(math.pi * (1.0 + s)))


def ntxent_formula(z1, z2, tau, *, decoupled: bool, dystress: Optional[tuple] = None) -> torch.Tensor:
    """Per-anchor losses [2, B] of one head. ``tau``: [2B] per-anchor temperatures; or ``dystress`` =
    (tau_min, tau_max, detach): τ_aj = τ(S_aj) on every logit."""
    B = z1.shape[0]
    Z = torch.cat((z1, z2))
    S = Z @ Z.T
    if dystress is not None:
        tau_min, tau_max, detach = dystress
        T = _dystress_tau(S.detach() if detach else S, tau_min, tau_max)
    else:
        T = tau.view(2 * B, 1).expand(2 * B, 2 * B)
    logits = S / T
    positives = torch.cat((torch.arange(B, 2 * B), torch.arange(B)))
    if not decoupled:
        masked = logits.masked_fill(torch.eye(2 * B, dtype=torch.bool), float("-inf"))
        return F.cross_entropy(masked, positives, reduction="none").view(2, B)
    losses = []
    for a in range(2 * B):
        p = int(positives[a])
        negatives = [j for j in range(2 * B) if j not in (a, p)]
        losses.append(-logits[a, p] + torch.logsumexp(logits[a, negatives], dim=0))
    return torch.stack(losses).view(2, B)


def formula_loss(z1, z2, tau, *, decoupled, reduction, dystress=None) -> torch.Tensor:
    """``ntxent_formula`` over heads (z [H, B, D], tau [H, 2B]), reduced as the library documents."""
    heads = torch.stack([ntxent_formula(z1[h], z2[h], None if tau is None else tau[h], decoupled=decoupled,
                                        dystress=dystress) for h in range(z1.shape[0])])
    if reduction == "none":
        return heads
    if reduction == "sum":
        return heads.sum()
    return (heads.flatten(1).sum(1) / heads[0].numel()).sum()


# ---------------------------------------------------------------------------------------------------------------
# Cases.

@dataclass(frozen=True)
class Case:
    B: int
    D: int
    H: Optional[int] = None
    mode: str = "per_sample"
    decoupled: bool = False
    reduction: str = "mean"
    tau_lo: float = 0.1
    tau_hi: float = 0.5
    scale: float = 1.0
    seed: int = 0


@st.composite
def cases(draw, max_b: int = 9, max_d: int = 6) -> Case:
    lo = draw(st.floats(0.05, 1.0))
    return Case(B=draw(st.integers(2, max_b)), D=draw(st.integers(1, max_d)),
                H=draw(st.sampled_from((None, 1, 2))), mode=draw(st.sampled_from(TEMPERATURE_MODES)),
                decoupled=draw(st.booleans()), reduction=draw(st.sampled_from(("mean", "sum", "none"))),
                tau_lo=lo, tau_hi=draw(st.floats(lo, 2 * lo)), scale=draw(st.sampled_from((0.5, 1.0, 2.0))),
                seed=draw(st.integers(0, 2**31 - 1)))


@dataclass
class Inputs:
    z1: torch.Tensor
    z2: torch.Tensor
    temperature: object  # what nt_xent gets
    tau_anchor: Optional[torch.Tensor]  # [H, 2B] per-anchor τ for the formula (None under DySTreSS)
    dystress: Optional[tuple]
    leaves: dict
    upstream: torch.Tensor


def make_inputs(case: Case, dtype=torch.float64, device="cpu") -> Inputs:
    """Random (never zero) inputs; float64 masters drawn first, so every dtype sees the same values."""
    g = torch.Generator().manual_seed(case.seed)
    H = case.H or 1
    lead = () if case.H is None else (case.H,)

    def view():
        z = torch.randn(*lead, case.B, case.D, generator=g, dtype=torch.float64) * (case.scale / case.D**0.5)
        return z.to(dtype).to(device).requires_grad_()

    z1, z2 = view(), view()
    leaves = {"z1": z1, "z2": z2}
    pdt = torch.float64 if dtype == torch.float64 else torch.float32

    def taus(*shape):
        value = case.tau_lo + (case.tau_hi - case.tau_lo) * torch.rand(shape, generator=g, dtype=torch.float64)
        return value.to(pdt).to(device)

    mode, dystress, temperature = case.mode, None, None
    if mode == "float":
        temperature = float(taus())
        anchor = torch.full((H, 2 * case.B), temperature, dtype=torch.float64)
    elif mode.startswith("dystress"):
        detach = mode == "dystress"
        temperature = mk.DySTreSS(case.tau_lo, case.tau_hi, detach=detach)
        dystress, anchor = (case.tau_lo, case.tau_hi, detach), None
    else:
        shape = {"scalar_tensor": (), "per_sample": (case.B,), "per_anchor": (2 * case.B,),
                 "learnable_per_sample": (case.B,), "learnable_per_anchor": (2 * case.B,),
                 "learnable_heads": (H, 2 * case.B)}[mode]
        temperature = taus(*shape)
        if "learnable" in mode:
            leaves["temperature"] = temperature.requires_grad_()
        anchor = temperature
    if anchor is not None:  # the formula's [H, 2B], built from the same leaf so gradients reach it
        if anchor.dim() == 0:
            anchor = anchor.expand(H, 2 * case.B)
        elif anchor.shape == (case.B,):
            anchor = torch.cat((anchor, anchor)).expand(H, 2 * case.B)
        elif anchor.dim() == 1:
            anchor = anchor.expand(H, 2 * case.B)
    out_shape = ((case.H,) if case.H else ()) + (2, case.B) if case.reduction == "none" else ()
    upstream = (0.5 + torch.rand(out_shape, generator=g, dtype=torch.float64)).to(device)
    return Inputs(z1, z2, temperature, anchor, dystress, leaves, upstream)


def formula_and_grads(case: Case, inp: Inputs):
    z1, z2 = (z if case.H else z.unsqueeze(0) for z in (inp.z1, inp.z2))
    out = formula_loss(z1, z2, None if inp.tau_anchor is None else inp.tau_anchor.double(),
                       decoupled=case.decoupled, reduction=case.reduction, dystress=inp.dystress)
    if case.H is None and case.reduction == "none":
        out = out.squeeze(0)
    return out, _grads(out, inp)


def library_and_grads(case: Case, inp: Inputs, backend: str):
    out = mk.nt_xent(inp.z1, inp.z2, inp.temperature, decoupled=case.decoupled, reduction=case.reduction,
                     backend=backend)
    return out, _grads(out, inp)


def _grads(out, inp: Inputs) -> dict:
    grads = torch.autograd.grad((out.double() * inp.upstream).sum(), list(inp.leaves.values()))
    return dict(zip(inp.leaves, grads))


def check_case(case: Case, backend: str, dtype=torch.float64, tol: float = 1e-9) -> None:
    device = support.test_device(backend)
    ref_out, ref_grads = formula_and_grads(case, make_inputs(case, torch.float64))
    out, grads = library_and_grads(case, make_inputs(case, dtype, device), backend)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    support.assert_matches_formula(backend, out, grads, ref_out, ref_grads, tol, case)


# ---------------------------------------------------------------------------------------------------------------
# Values and gradients against the formula.

@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=12)
@given(case=cases())
def test_matches_the_formula_float64(backend, case):
    check_case(case, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", TEMPERATURE_MODES)
@pytest.mark.parametrize("decoupled", (False, True), ids=("ntxent", "dcl"))
def test_every_temperature_mode(backend, mode, decoupled):
    """Each temperature form, plain and decoupled, with heads and a non-power-of-two B spanning several tiles."""
    check_case(Case(B=13, D=5, H=2, mode=mode, decoupled=decoupled, reduction="none", seed=7), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_d1_and_b2(backend):
    check_case(Case(B=2, D=1, mode="learnable_per_anchor", decoupled=True, seed=3), backend)
    check_case(Case(B=2, D=1, mode="dystress_grad", seed=4), backend)


@backend_marker("cpp")
@pytest.mark.parametrize("block", ("4x4", "8x8", "8x4", "16x16"))
@settings(max_examples=8)
@given(case=cases(max_b=21))
def test_cpp_tiles(block, case):
    """Several tiles per axis: square tiles run the Gram mode (one triangle of S serves rows and columns), "8x4" the
    full sweep; both backward schedules (deterministic=True runs the full one)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MMTS_KERNELS_CPP_BLOCK", block)
        check_case(case, "cpp")
        inp = make_inputs(case)
        out, grads = library_and_grads(case, inp, "cpp")
        again = mk.nt_xent(inp.z1, inp.z2, inp.temperature, decoupled=case.decoupled, reduction=case.reduction,
                           backend="cpp", deterministic=True)
        again_grads = _grads(again, inp)
    assert rel_err(again, out) <= 1e-12
    for name in grads:
        assert rel_err(again_grads[name], grads[name]) <= 1e-12


@backend_marker("cpp")
@pytest.mark.parametrize("threads", (1, 3, 12))
def test_cpp_gram_mode_thread_counts(monkeypatch, threads):
    """The Gram backward pairs up parts of the triangle of tiles in rounds (2T parts for T threads, no buffers), at
    any thread count: odd ones, and more threads than blocks."""
    monkeypatch.setenv("MMTS_KERNELS_CPP_BLOCK", "4x4")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_case(Case(B=23, D=5, H=2, mode="learnable_per_anchor", decoupled=True, reduction="none", seed=13),
                   "cpp")
        check_case(Case(B=17, D=3, mode="dystress_grad", seed=14), "cpp")
    finally:
        torch.set_num_threads(before)


@backend_marker("cpp")
def test_cpp_gram_mode_is_bitwise_reproducible(monkeypatch):
    monkeypatch.setenv("MMTS_KERNELS_CPP_BLOCK", "8x8")
    case = Case(B=37, D=6, mode="learnable_per_sample", decoupled=True, seed=12)
    first = library_and_grads(case, make_inputs(case, torch.float32), "cpp")
    second = library_and_grads(case, make_inputs(case, torch.float32), "cpp")
    assert torch.equal(first[0], second[0])
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name])


@backend_marker("cpp")
@settings(max_examples=10)
@given(case=cases(max_b=40, max_d=24))
def test_cpp_float32(case):
    """fp32 to 1e-5 of the float64 formula (on the same fp32-rounded inputs)."""
    case = replace(case, tau_lo=max(case.tau_lo, 0.1), tau_hi=max(case.tau_hi, 0.1))
    ref = make_inputs(case, torch.float32)
    ref = replace(ref, z1=ref.z1.detach().double().requires_grad_(), z2=ref.z2.detach().double().requires_grad_())
    ref.leaves.update(z1=ref.z1, z2=ref.z2)
    if "temperature" in ref.leaves:
        leaf = ref.leaves["temperature"].detach().double().requires_grad_()
        ref.leaves["temperature"] = leaf
        anchor = torch.cat((leaf, leaf)) if leaf.shape == (case.B,) else leaf
        ref.tau_anchor = anchor.expand(case.H or 1, 2 * case.B)
    ref_out, ref_grads = formula_and_grads(case, ref)
    out, grads = library_and_grads(case, make_inputs(case, torch.float32), "cpp")
    assert out.dtype == torch.float32
    for name, a, b in [("loss", out, ref_out)] + [(k, grads[k], ref_grads[k]) for k in ref_grads]:
        assert rel_err(a, b) <= 1e-5, f"cpp fp32 {name}: {rel_err(a, b):.3e} on {case}"


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "torch"])
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=("bf16", "fp16"))
def test_low_precision_no_worse_than_torch(backend, dtype):
    """16-bit views: no worse than the torch reference run on the same 16-bit inputs, plus a small tolerance."""
    case = Case(B=19, D=8, H=2, mode="learnable_per_sample", decoupled=True, reduction="none", seed=21)
    low = make_inputs(case, dtype, support.test_device(backend))
    exact = make_inputs(case, torch.float64)
    exact = replace(exact, z1=low.z1.detach().double().cpu().requires_grad_(),
                    z2=low.z2.detach().double().cpu().requires_grad_())
    exact.leaves.update(z1=exact.z1, z2=exact.z2)
    ref_out, ref_grads = formula_and_grads(case, exact)
    for name, (out, grads) in (("torch", library_and_grads(case, make_inputs(case, dtype), "torch")),
                               (backend, library_and_grads(case, low, backend))):
        errors = [rel_err(out, ref_out)] + [rel_err(grads[k], ref_grads[k]) for k in ("z1", "z2")]
        if name == "torch":
            bars = [2 * e + 1e-3 for e in errors]
        else:
            assert all(e <= b for e, b in zip(errors, bars)), (backend, errors, bars)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dystress_detach_false_in_info_nce(backend):
    """DySTreSS(detach=False) through the symmetric and one-directional InfoNCE: gradients through τ(S) too."""
    g = torch.Generator().manual_seed(11)
    device = support.test_device(backend)
    dys = mk.DySTreSS(0.1, 0.3, detach=False)
    for symmetric in (True, False):
        x = (0.4 * torch.randn(2, 9, 3, generator=g, dtype=torch.float64)).to(device).requires_grad_()
        y = (0.4 * torch.randn(2, 9, 3, generator=g, dtype=torch.float64)).to(device).requires_grad_()
        targets = None if symmetric else torch.randint(0, 9, (9,), generator=g).to(device)
        w = (0.5 + torch.rand((2, 2, 9) if symmetric else (2, 9), generator=g, dtype=torch.float64)).to(device)
        out = mk.info_nce(x, y, dys, symmetric=symmetric, targets=targets, reduction="none", backend=backend)
        grads = torch.autograd.grad((out * w).sum(), (x, y))
        # the formula: S/τ(S) with τ differentiable, per row (and per column)
        xs, ys = (t.detach().cpu().requires_grad_() for t in (x, y))
        S = xs @ ys.transpose(1, 2)
        logits = S / _dystress_tau(S, 0.1, 0.3)
        t = torch.arange(9) if symmetric else targets.cpu()
        row = torch.logsumexp(logits, 2) - logits.gather(2, t.view(1, 9, 1).expand(2, 9, 1)).squeeze(2)
        ref = torch.stack((row, torch.logsumexp(logits, 1) - logits.diagonal(dim1=1, dim2=2)), 1) if symmetric \
            else row
        ref_grads = torch.autograd.grad((ref * w.cpu()).sum(), (xs, ys))
        assert rel_err(out, ref) <= 1e-9
        assert rel_err(grads[0], ref_grads[0]) <= 1e-9
        assert rel_err(grads[1], ref_grads[1]) <= 1e-9
        plain = mk.info_nce(x, y, mk.DySTreSS(0.1, 0.3), symmetric=symmetric, targets=targets, reduction="none",
                            backend=backend)
        plain_grad = torch.autograd.grad((plain * w).sum(), x)[0]
        assert rel_err(plain_grad, grads[0]) > 1e-3  # detach=False is a different gradient, not a no-op


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "torch"])
@pytest.mark.parametrize("dystress", (False, True), ids=("tau", "dystress_grad"))
def test_opcheck_with_excluded_columns(backend, dystress):
    """Schema, fake kernel and autograd registration of the ops with self_cols / decoupled / dys_grad."""
    from mmts_kernels import cpp_backend  # noqa: F401  (registers the cpp op's fake kernel and autograd)

    g = torch.Generator().manual_seed(9)
    device = support.test_device(backend)
    x = torch.randn(1, 6, 3, generator=g).to(device).requires_grad_()
    tau = None if dystress else (0.1 + torch.rand(1, 6, generator=g)).to(device).requires_grad_()
    targets = torch.tensor([3, 4, 5, 0, 1, 2], device=device)
    self_cols = torch.arange(6, device=device)
    flags = (True, False, False, not dystress, False, dystress, 0.1 if dystress else 0.0,
             0.3 if dystress else 0.0, False)
    if backend == "cpp":
        op, args = torch.ops.mmts_kernels.cpu_stats.default, (x, x, tau, None, targets, *flags, 4, 4)
    else:
        from mmts_kernels.triton_backend import op as triton_op  # noqa: F401  (registers the ops)

        op, args = torch.ops.mmts_kernels.triton_stats, (x, x, tau, None, targets, *flags)
    torch.library.opcheck(op, args + (self_cols, True, dystress),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ---------------------------------------------------------------------------------------------------------------
# What the loss is and is not.

def test_not_the_old_info_nce_on_concatenated_views():
    """info_nce(x = y = cat(views)) counts the self-similarity S_aa in every denominator: a different loss."""
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    Z = torch.cat((z1, z2))
    positives = torch.cat((torch.arange(6, 12), torch.arange(6)))
    old = mk.info_nce(Z, Z, 0.1, symmetric=False, targets=positives, backend="torch")
    new = mk.nt_xent(z1, z2, 0.1, backend="torch")
    assert abs(float(old - new)) > 1e-2, (old, new)
    expected = formula_loss(z1[None], z2[None], torch.full((1, 12), 0.1, dtype=torch.float64), decoupled=False,
                            reduction="mean")
    assert rel_err(new, expected) <= 1e-12


def test_decoupled_drops_the_positive_from_the_denominator():
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    plain = mk.nt_xent(z1, z2, 0.2, reduction="none", backend="torch")
    dcl = mk.nt_xent(z1, z2, 0.2, decoupled=True, reduction="none", backend="torch")
    S = torch.cat((z1, z2)) @ torch.cat((z1, z2)).T / 0.2
    pos = torch.cat((S.diagonal(5), S.diagonal(-5))).view(2, 5)
    # plain lse = log(e^{pos} + Σ_negatives) = logaddexp(pos, dcl + pos) with dcl = lse_neg − pos
    assert rel_err(plain, torch.logaddexp(torch.zeros_like(dcl), dcl)) <= 1e-12
    assert (dcl < plain).all()
    assert pos.shape == (2, 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_and_normalize(backend):
    device = support.test_device(backend)
    g = torch.Generator().manual_seed(3)
    z1, z2 = (torch.randn(2, 7, 4, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    none = mk.nt_xent(z1, z2, 0.3, reduction="none", backend=backend, normalize=True)
    assert none.shape == (2, 2, 7)
    total = mk.nt_xent(z1, z2, 0.3, reduction="sum", backend=backend, normalize=True)
    mean = mk.nt_xent(z1, z2, 0.3, backend=backend, normalize=True)
    assert rel_err(total, none.sum()) <= 1e-12
    assert rel_err(mean, none.sum(dim=(1, 2)).div(14).sum()) <= 1e-12
    unit = mk.nt_xent(F.normalize(z1, dim=-1), F.normalize(z2, dim=-1), 0.3, reduction="none", backend=backend)
    assert rel_err(none, unit) <= 1e-12
    assert mk.nt_xent(z1[0], z2[0], 0.3, reduction="none", backend=backend).shape == (2, 7)


def test_per_sample_temperature_is_shared_by_both_views():
    g = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    tau = 0.1 + torch.rand(4, generator=g, dtype=torch.float64)
    a = mk.nt_xent(z1, z2, tau, reduction="none", backend="torch")
    b = mk.nt_xent(z1, z2, torch.cat((tau, tau)), reduction="none", backend="torch")
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: ValueError / TypeError naming the argument, before anything runs.

def _z(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


BAD = [
    (dict(z1=_z(4, 3), z2=_z(5, 3)), ValueError, "z1 and z2"),
    (dict(z1=_z(4, 3), z2=_z(4, 2)), ValueError, "z1 and z2"),
    (dict(z1=_z(2, 4, 3), z2=_z(4, 3)), ValueError, "z1 and z2"),
    (dict(z1=_z(1, 3), z2=_z(1, 3)), ValueError, "at least 2"),
    (dict(z1=_z(3), z2=_z(3)), ValueError, "z1 must have shape"),
    (dict(z1=[[1.0]], z2=_z(4, 3)), TypeError, "z1 must be a torch.Tensor"),
    (dict(z1=_z(4, 3), z2=_z(4, 3, dtype=torch.float64)), TypeError, "same dtype"),
    (dict(z1=torch.ones(4, 3, dtype=torch.int64), z2=torch.ones(4, 3, dtype=torch.int64)), TypeError, "z1 must be"),
    (dict(temperature=torch.full((5,), 0.1)), ValueError, "temperature must be .*B=4"),
    (dict(temperature=torch.full((9,), 0.1)), ValueError, "temperature"),
    (dict(temperature=torch.full((8,), -0.1)), ValueError, "temperature"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature="0.1"), TypeError, "temperature"),
    (dict(decoupled=1), TypeError, "decoupled must be a bool"),
    (dict(normalize="yes"), TypeError, "normalize must be a bool"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(deterministic="no"), TypeError, "deterministic"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input(kwargs, error, match):
    args = dict(z1=_z(4, 3), z2=_z(4, 3), temperature=0.1)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        mk.nt_xent(args.pop("z1"), args.pop("z2"), **args)


def test_dystress_detach_must_be_bool():
    with pytest.raises(TypeError, match="detach must be a bool"):
        mk.DySTreSS(0.1, 0.2, detach="no")


# ---------------------------------------------------------------------------------------------------------------
# Distributed: 2 gloo processes with unequal local batches against one process on the concatenated batch.

LOCAL_SIZES = (3, 5)
DIST_CASES = [  # (name, backend, reduction, temperature mode, decoupled, heads, same_label with 3 classes)
    ("torch-mean-learnable", "torch", "mean", "learnable_per_sample", False, None, None),
    ("torch-none-dystress-grad-dcl", "torch", "none", "dystress_grad", True, None, None),
    ("cpp-sum-per-anchor-heads", "cpp", "sum", "learnable_per_anchor", False, 2, None),
    ("cpp-mean-dcl-float", "cpp", "mean", "float", True, None, None),
    ("cpp-none-dystress", "cpp", "none", "dystress", False, 2, None),
    ("torch-supcon-mean", "torch", "mean", "learnable_per_sample", False, None, "positive"),
    ("torch-ignore-none-dcl", "torch", "none", "learnable_per_anchor", True, None, "ignore"),
    ("cpp-supcon-sum-heads", "cpp", "sum", "learnable_per_sample", False, 2, "positive"),
    ("cpp-ignore-mean-dystress", "cpp", "mean", "dystress", False, None, "ignore"),
]


def _dist_labels(same_label: Optional[str]) -> Optional[torch.Tensor]:
    """The global batch's labels: 3 classes in a fixed shuffled order (every rank holds several classes)."""
    if same_label is None:
        return None
    B = sum(LOCAL_SIZES)
    return (torch.arange(B) % 3)[torch.randperm(B, generator=torch.Generator().manual_seed(9))]


def _dist_inputs(mode: str, heads: Optional[int]):
    """The global batch (float64): z1, z2 [H?, B, D] and the temperature's global value."""
    g = torch.Generator().manual_seed(5)
    B, lead = sum(LOCAL_SIZES), ((heads,) if heads else ())
    z1, z2 = (torch.randn(*lead, B, 3, generator=g, dtype=torch.float64) for _ in range(2))
    if mode == "float":
        return z1, z2, 0.2
    if mode.startswith("dystress"):
        return z1, z2, mk.DySTreSS(0.1, 0.3, detach=mode == "dystress")
    tau = 0.1 + 0.5 * torch.rand(B, generator=g, dtype=torch.float64)
    return z1, z2, tau


def _local(value, lo: int, hi: int, mode: str):
    """This rank's share of the global temperature: per-sample [B] → its slice; per-anchor [2B] → its two slices."""
    if not isinstance(value, torch.Tensor):
        return value
    if mode == "learnable_per_anchor":
        B = value.shape[0]
        both = torch.cat((value, value))  # the global per-anchor τ: z1's anchors, then z2's
        return torch.cat((both[lo:hi], both[B + lo: B + hi]))
    return value[lo:hi]


def _dist_run(rank, world, name, backend, reduction, mode, decoupled, heads, same_label, group):
    z1, z2, temperature = _dist_inputs(mode, heads)
    labels = _dist_labels(same_label)
    lo, hi = sum(LOCAL_SIZES[:rank]), sum(LOCAL_SIZES[:rank + 1])
    l1 = z1[..., lo:hi, :].clone().requires_grad_()
    l2 = z2[..., lo:hi, :].clone().requires_grad_()
    tau = _local(temperature, lo, hi, mode)
    leaves = [l1, l2]
    if isinstance(tau, torch.Tensor):
        tau = tau.clone().requires_grad_()
        leaves.append(tau)
    extra = {} if labels is None else dict(labels=labels[lo:hi], same_label=same_label)
    out = mk.nt_xent(l1, l2, tau, decoupled=decoupled, reduction=reduction, backend=backend, process_group=group,
                     **extra)
    w = _upstream(out.shape) if reduction == "none" else torch.ones((), dtype=torch.float64)
    grads = torch.autograd.grad((out * w).sum(), leaves)
    return {"out": out.detach(), "grads": [gr.detach() for gr in grads]}


def _upstream(shape):
    return 0.5 + torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=torch.float64)


def _dist_worker(rank: int, world: int, tmpdir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmpdir}/rendezvous", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        for case in DIST_CASES:
            try:
                results[case[0]] = _dist_run(rank, world, *case, group=torch.distributed.group.WORLD)
            except Exception:
                results[case[0]] = {"error": traceback.format_exc()}
        torch.save(results, os.path.join(tmpdir, f"rank{rank}.pt"))
        torch.distributed.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    import torch.multiprocessing as mp

    tmpdir = str(tmp_path_factory.mktemp("ntxent_dist"))
    world = len(LOCAL_SIZES)
    context = mp.start_processes(_dist_worker, args=(world, tmpdir), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=240)
    while not context.join(timeout=5):
        if datetime.datetime.now() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("the gloo group did not finish within 240 s")
    return [torch.load(os.path.join(tmpdir, f"rank{r}.pt")) for r in range(world)]


@pytest.mark.parametrize("case", DIST_CASES, ids=[c[0] for c in DIST_CASES])
def test_distributed_matches_single_process(dist_results, case):
    name, backend, reduction, mode, decoupled, heads, same_label = case
    if backend != "torch" and mk.available_backends()[backend] is not None:
        pytest.skip(f"backend {backend} unavailable")
    for r in dist_results:
        assert "error" not in r[name], r[name].get("error")
    world = len(LOCAL_SIZES)
    z1, z2, temperature = _dist_inputs(mode, heads)
    B = sum(LOCAL_SIZES)
    leaves = [z1.requires_grad_(), z2.requires_grad_()]
    tau = temperature
    if isinstance(temperature, torch.Tensor):  # a global per-sample [B] or, per anchor, [2B] leaf
        tau = torch.cat((temperature, temperature)) if mode == "learnable_per_anchor" else temperature
        tau = tau.detach().requires_grad_()
        leaves.append(tau)
    labels = _dist_labels(same_label)
    extra = {} if labels is None else dict(labels=labels, same_label=same_label)
    single = mk.nt_xent(z1, z2, tau, decoupled=decoupled, reduction=reduction, backend="torch", **extra)
    outs = [r[name]["out"] for r in dist_results]
    if reduction == "none":
        assert rel_err(torch.cat(outs, dim=-1), single) <= 1e-12
        w = torch.cat([_upstream(o.shape) for o in outs], dim=-1)
        grads = torch.autograd.grad((single * w).sum(), leaves)
        scale = 1.0
    else:
        assert rel_err(torch.stack(outs).mean(), single) <= 1e-12
        grads = torch.autograd.grad(single, leaves)
        scale = 1.0 / world  # each rank's gradient is W × its share of the single-process gradient
    for rank, r in enumerate(dist_results):
        lo, hi = sum(LOCAL_SIZES[:rank]), sum(LOCAL_SIZES[:rank + 1])
        got = r[name]["grads"]
        assert rel_err(got[0] * scale, grads[0][..., lo:hi, :]) <= 1e-12
        assert rel_err(got[1] * scale, grads[1][..., lo:hi, :]) <= 1e-12
        if len(got) > 2:  # τ stays local: rank r's [b] slice, or its two [b] slices of the per-anchor [2B]
            expected = grads[2][lo:hi]
            if mode == "learnable_per_anchor":
                expected = torch.cat((grads[2][lo:hi], grads[2][B + lo: B + hi]))
            assert rel_err(got[2] * scale, expected) <= 1e-12


@backend_marker("cpp")
def test_torch_compile_fullgraph():
    """nt_xent traces through validation, the op's fake kernel and its autograd (fullgraph=True)."""
    g = torch.Generator().manual_seed(8)
    z1, z2 = (torch.randn(10, 4, generator=g, requires_grad=True) for _ in range(2))
    tau = (0.1 + torch.rand(10, generator=g)).requires_grad_()
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b, t: mk.nt_xent(a, b, t, decoupled=True, backend="cpp"), backend="aot_eager",
                       fullgraph=True)
    compiled = fn(z1, z2, tau)
    eager = mk.nt_xent(z1, z2, tau, decoupled=True, backend="cpp")
    assert torch.equal(compiled, eager)
    for a, b in zip(torch.autograd.grad(compiled, (z1, z2, tau)), torch.autograd.grad(eager, (z1, z2, tau))):
        assert torch.equal(a, b)
