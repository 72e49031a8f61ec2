"""Shared test support, imported by every test file: the one CUDA skip marker, which backends must run here (CI)
and the skip marker of the others, hypothesis strategies for loss cases, and the comparison of any backend against
the float64 reference (values and every gradient)."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Optional

import pytest
import torch
from hypothesis import strategies as st

import mmts_kernels as mk
from mmts_kernels import losses, reference
from mmts_kernels.temperature import MAX_TEMPERATURE
from mmts_kernels.validation import validate

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to torch)")


# ---------------------------------------------------------------------------------------------------------------
# Which backends must run. On a user's machine a backend that cannot run (no compiler, no GPU) skips its tests with
# the library's reason. In CI a skip would hide a broken backend, so there the backends CI is meant to run are
# *required*: conftest.py stops the session with an error before any test runs if one of them cannot run, and
# backend_marker never skips them.

REQUIRE_ENV = "MMTS_KERNELS_REQUIRE_BACKENDS"
# CI=true without MMTS_KERNELS_REQUIRE_BACKENDS: the CPU-only CI machine runs cpp natively and triton under its
# interpreter.
CI_DEFAULT_REQUIRED = ("cpp", "triton")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def required_backends() -> frozenset:
    """The backends whose tests must run here: MMTS_KERNELS_REQUIRE_BACKENDS ("cpp triton", "cpp,triton", or ""
    for none) when set, else ``CI_DEFAULT_REQUIRED`` under CI=true, else none."""
    spec = os.environ.get(REQUIRE_ENV)
    if spec is None:
        return frozenset(CI_DEFAULT_REQUIRED) if in_ci() else frozenset()
    names = frozenset(spec.replace(",", " ").split())
    unknown = names - set(mk.available_backends())
    if unknown:
        raise ValueError(f"{REQUIRE_ENV} names unknown backends {sorted(unknown)}; "
                         f"known: {sorted(mk.available_backends())}")
    return names


def missing_required_backends() -> dict:
    """backend -> why it cannot run, for every required backend that cannot run here (empty when all can)."""
    reasons = mk.available_backends()
    return {name: reasons[name] for name in sorted(required_backends()) if reasons[name] is not None}


def backend_marker(name: str):
    """Skip a test when backend ``name`` cannot run on any device here, with the library's own reason — unless the
    backend is required (CI): then the test runs, and fails on the backend's own error."""
    reason = mk.available_backends()[name]
    skip = reason is not None and name not in required_backends()
    return pytest.mark.skipif(skip, reason=f"backend {name!r} unavailable: {reason}")


def test_device(backend: str) -> torch.device:
    """Where a backend's tests run: the GPU when there is one (triton), the CPU otherwise."""
    if backend == "triton" and torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return torch.device("cuda")
    return torch.device("cpu")


def run_python(script: str, **env) -> subprocess.CompletedProcess:
    """``script`` (dedented) in a fresh interpreter with this one's import path (``support`` included) and the
    environment plus ``env``: for what a process reads once (environment variables, the first build)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **env})


# ---------------------------------------------------------------------------------------------------------------
# Cases: one loss configuration with its shapes, drawn by hypothesis.

TEMPERATURE_MODES = ("float", "scalar_tensor", "per_sample", "learnable_scalar", "learnable_per_sample", "dystress")
MARGIN_MODES = ("float", "per_sample", "learnable_per_sample")


@dataclass(frozen=True)
class Case:
    N: int
    M: int
    D: int
    H: Optional[int] = None  # None: no head axis
    loss: str = "infonce"
    hardest_negative: bool = False
    symmetric: bool = True
    reduction: str = "mean"
    temperature_mode: str = "per_sample"
    tau_lo: float = 0.05
    tau_hi: float = 0.5
    margin_mode: str = "per_sample"
    scale: float = 1.0  # input norm scale; unit-norm-ish rows when 1
    dtype: torch.dtype = torch.float32
    seed: int = 0


@st.composite
def cases(draw, max_n: int = 64, max_d: int = 64, dtypes=(torch.float32,), heads: bool = True) -> Case:
    loss = draw(st.sampled_from(("infonce", "max_margin")))
    hardest = loss == "max_margin" and draw(st.booleans())
    symmetric = draw(st.booleans())
    N = draw(st.integers(2 if symmetric else 1, max_n))
    M = N if symmetric else draw(st.integers(2, max_n))
    tau_lo = draw(st.floats(1e-3, MAX_TEMPERATURE))
    tau_hi = draw(st.floats(tau_lo, min(MAX_TEMPERATURE, 4 * tau_lo)))
    return Case(
        N=N, M=M, D=draw(st.integers(1, max_d)),
        H=draw(st.sampled_from((None, 1, 3))) if heads else None,
        loss=loss, hardest_negative=hardest, symmetric=symmetric,
        reduction=draw(st.sampled_from(("mean", "sum", "none"))),
        temperature_mode=draw(st.sampled_from(TEMPERATURE_MODES)),
        tau_lo=tau_lo, tau_hi=tau_hi,
        margin_mode=draw(st.sampled_from(MARGIN_MODES)),
        scale=draw(st.sampled_from((0.3, 1.0, 3.0))),
        dtype=draw(st.sampled_from(dtypes)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@dataclass
class Inputs:
    """Leaf tensors of one case and the keyword arguments of ``mk.contrastive_loss``."""

    x: torch.Tensor
    y: torch.Tensor
    leaves: dict  # name -> leaf tensor whose gradient is compared
    kwargs: dict
    upstream: torch.Tensor  # random weights of the output: grad_output != 1


def make_inputs(case: Case, dtype: torch.dtype, device="cpu", round_to: Optional[torch.dtype] = None) -> Inputs:
    """Random (never zero) inputs of ``case``; float64 masters are drawn first so every dtype sees the same data.

    ``round_to``: pass the values through that dtype first (embeddings in it, τ and margins in its parameter dtype),
    then store them as ``dtype``: the float64 reference of a low-precision run sees exactly the backend's inputs, so
    a comparison measures arithmetic error, not the rounding of the inputs.
    """
    g = torch.Generator().manual_seed(case.seed)
    lead = () if case.H is None else (case.H,)
    x64 = torch.randn(*lead, case.N, case.D, generator=g, dtype=torch.float64) * (case.scale / case.D**0.5)
    y64 = torch.randn(*lead, case.M, case.D, generator=g, dtype=torch.float64) * (case.scale / case.D**0.5)
    round_to = round_to or dtype
    x = x64.to(round_to).to(device=device, dtype=dtype).requires_grad_()
    y = y64.to(round_to).to(device=device, dtype=dtype).requires_grad_()
    leaves = {"x": x, "y": y}
    round_pdt = torch.float64 if round_to == torch.float64 else torch.float32
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    kwargs = dict(loss=case.loss, hardest_negative=case.hardest_negative, symmetric=case.symmetric,
                  reduction=case.reduction)
    if not case.symmetric:
        kwargs["targets"] = torch.randint(0, case.M, (case.N,), generator=g).to(device)

    def per_sample(lo, hi, shape):
        value = lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)
        return value.to(round_pdt).to(device=device, dtype=pdt)

    mode = case.temperature_mode
    if mode == "float":
        kwargs["temperature"] = float(per_sample(case.tau_lo, case.tau_hi, ()))
    elif mode == "dystress":
        kwargs["temperature"] = mk.DySTreSS(case.tau_lo, case.tau_hi)
    else:
        tau = per_sample(case.tau_lo, case.tau_hi, () if "scalar" in mode else (case.N,))
        if "learnable" in mode:
            leaves["temperature"] = tau.requires_grad_()
        kwargs["temperature"] = tau
    if case.margin_mode == "float":
        kwargs["margin"] = float(per_sample(0.05, 0.5, ()))
    else:
        margin = per_sample(0.05, 0.5, (case.N,))
        if "learnable" in case.margin_mode:
            leaves["margin"] = margin.requires_grad_()
        kwargs["margin"] = margin
    out_shape = ([case.H] if case.H is not None and case.reduction == "none" else []) + (
        ([2] if case.symmetric else []) + [case.N] if case.reduction == "none" else [])
    upstream = (0.5 + torch.rand(out_shape, generator=g, dtype=torch.float64)).to(device)
    return Inputs(x, y, leaves, kwargs, upstream)


def loss_and_grads(inputs: Inputs, loss_fn=None, **extra):
    """The loss and the gradients of every leaf, for the weighted sum Σ upstream·loss."""
    loss_fn = loss_fn or mk.contrastive_loss
    out = loss_fn(inputs.x, inputs.y, **inputs.kwargs, **extra)
    used = {k: v for k, v in inputs.leaves.items() if _used(k, inputs.kwargs)}
    grads = torch.autograd.grad((out.double() * inputs.upstream).sum(), list(used.values()), allow_unused=True)
    return out.detach(), {k: (torch.zeros_like(v) if gr is None else gr) for (k, v), gr in zip(used.items(), grads)}


def _used(name: str, kwargs: dict) -> bool:
    if name == "temperature":
        return kwargs["loss"] == "infonce"
    if name == "margin":
        return kwargs["loss"] == "max_margin"
    return True


def lowprec_reference_loss(x, y, **kwargs):
    """The torch reference run in the input's low precision (S computed in that dtype): the accuracy baseline."""
    kwargs.pop("backend", None)
    problem = validate(x, y, check_finite=False, backend="torch", deterministic=None,
                       **{k: kwargs.get(k, d) for k, d in _DEFAULTS.items()})
    shim = SimpleNamespace(compute_stats=functools.partial(reference.compute_stats, upcast=False))
    return losses.loss_from_problem(problem, shim)


_DEFAULTS = dict(loss="infonce", temperature=0.07, margin=0.2, hardest_negative=False, targets=None,
                 symmetric=True, reduction="mean")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (the DESIGN §6 measure); absolute when ref is 0."""
    out, ref = out.double().cpu(), ref.double().cpu()
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def targets_and_labels(layout: str, N: int, M: int, classes: int, g: torch.Generator, *, ring: bool = False):
    """(targets [N], self_cols [N] or None, labels_x [N], labels_y [M]) of a statistics-level case with
    ``classes`` classes (clamped to [1, N]: one big class to singletons), every target a same-label column:

        "views"   x = y = Z = cat(z1, z2) of B = N/2 samples: positive a ± B, self column a, both views of a sample
                  share its label, at least two classes (a decoupled row keeps a negative)
        "square"  targets arange(N), one label per sample on both sides
        "rect"    random targets into M columns, labels_x[i] = labels_y[targets[i]]; ``ring``: about half the rows
                  get target −1 (no positive in this block, the sigmoid ring's case) and a random label
    """
    classes = max(1, min(classes, N))
    if layout == "views":
        B = N // 2
        i = torch.arange(B)
        base = torch.arange(B) % max(2, classes)
        return torch.cat((i + B, i)), torch.cat((i, i + B)), torch.cat((base, base)), torch.cat((base, base))
    if layout == "square":
        labels = torch.randint(0, classes, (N,), generator=g)
        return torch.arange(N), None, labels, labels
    targets = torch.randint(0, M, (N,), generator=g)
    labels_y = torch.randint(0, classes, (M,), generator=g)
    labels_x = labels_y[targets]
    if ring:
        targets = torch.where(torch.rand(N, generator=g) < 0.5, -1, targets)
        labels_x = torch.where(targets < 0, torch.randint(0, classes, (N,), generator=g), labels_x)
    return targets, None, labels_x, labels_y


def assert_matches_formula(backend: str, out, grads: dict, ref_out, ref_grads: dict, tol: float, context) -> None:
    """A loss and its gradients (name -> tensor) against a float64 formula's: same shape, and every relative error
    (``rel_err``) at most ``tol``; the message names the backend, the quantity and ``context`` (the case)."""
    assert out.shape == ref_out.shape, (out.shape, ref_out.shape)
    errors = {"loss": rel_err(out, ref_out), **{k: rel_err(grads[k], ref_grads[k]) for k in ref_grads}}
    for name, err in errors.items():
        assert err <= tol, f"{backend} {name}: rel err {err:.3e} > {tol:.0e} on {context}"


def check_backend_against_reference(case: Case, backend: str, *, device=None, fp32_tol: float = 1e-5,
                                    lowprec_slack: float = 2.0, lowprec_tol: float = 1e-3, **extra) -> None:
    """Values and all gradients of ``backend`` on ``case`` against the float64 torch reference, computed on the
    same (rounded) inputs the backend gets.

    fp32/fp64: ‖out − ref‖/‖ref‖ ≤ fp32_tol (1e-5 by DESIGN §6; pass a tighter one for fp64). In fp32, where the
    torch reference run in fp32 misses that bar itself (ill-conditioned cases), no worse than ``lowprec_slack`` × its
    error.
    bf16/fp16: no worse than ``lowprec_slack`` × the error of the torch reference run in the same low precision,
    plus ``lowprec_tol``.
    """
    device = device or test_device(backend)
    ref = make_inputs(case, torch.float64, round_to=case.dtype)
    ref_out, ref_grads = loss_and_grads(ref, backend="torch")
    got = make_inputs(case, case.dtype, device)
    out, grads = loss_and_grads(got, backend=backend, **extra)
    assert out.dtype == (torch.float64 if case.dtype == torch.float64 else torch.float32), out.dtype
    assert out.shape == ref_out.shape, (out.shape, ref_out.shape)
    pairs = [("loss", out, ref_out)] + [(k, grads[k], ref_grads[k]) for k in ref_grads]
    if case.dtype in (torch.float32, torch.float64):
        errors = {name: rel_err(a, b) for name, a, b in pairs}
        bars = dict.fromkeys(errors, fp32_tol)
        if case.dtype == torch.float32 and max(errors.values()) > fp32_tol:
            # An ill-conditioned case (gradient entries that cancel, τ ~ 1e-2, D = 1) where fp32 arithmetic itself
            # cannot reach the bar: then the bar is the torch reference's own fp32 error, times lowprec_slack.
            same = make_inputs(case, case.dtype, device)
            same_out, same_grads = loss_and_grads(same, backend="torch")
            own = {"loss": rel_err(same_out, ref_out), **{k: rel_err(same_grads[k], ref_grads[k]) for k in ref_grads}}
            bars = {name: max(fp32_tol, lowprec_slack * own[name]) for name in errors}
        for name, err in errors.items():
            assert err <= bars[name], f"{backend} {name}: rel err {err:.3e} > {bars[name]:.1e} on {case}"
        return
    low = make_inputs(case, case.dtype, device)
    low_out, low_grads = loss_and_grads(low, loss_fn=lowprec_reference_loss)
    low_pairs = [low_out] + [low_grads[k] for k in ref_grads]
    for (name, a, b), c in zip(pairs, low_pairs):
        err, base = rel_err(a, b), rel_err(c, b)
        assert err <= lowprec_slack * base + lowprec_tol, (
            f"{backend} {name}: rel err {err:.3e} > {lowprec_slack}×{base:.3e} + {lowprec_tol:.0e} on {case}")


def with_dtype(case: Case, dtype: torch.dtype) -> Case:
    return replace(case, dtype=dtype)


def gradcheck_loss(backend: str, loss: str, hardest_negative: bool, symmetric: bool, **extra) -> bool:
    """torch.autograd.gradcheck in float64 of the per-anchor terms w.r.t. x, y, a per-sample τ and margin."""
    g = torch.Generator().manual_seed(5)
    N, M, D = 5, (5 if symmetric else 4), 3
    x = torch.randn(N, D, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(M, D, generator=g, dtype=torch.float64, requires_grad=True)
    tau = (0.1 + torch.rand(N, generator=g, dtype=torch.float64)).requires_grad_()
    margin = (0.1 + 0.3 * torch.rand(N, generator=g, dtype=torch.float64)).requires_grad_()
    targets = None if symmetric else torch.randint(0, M, (N,), generator=g)

    def f(x, y, tau, margin):
        return mk.contrastive_loss(x, y, loss=loss, hardest_negative=hardest_negative, temperature=tau,
                                   margin=margin, targets=targets, symmetric=symmetric, reduction="none",
                                   backend=backend, **extra)

    return torch.autograd.gradcheck(f, (x, y, tau, margin))


# ---------------------------------------------------------------------------------------------------------------
# Memory: every tensor an op creates, seen through a dispatch mode (works for custom ops and autograd too).

class AllocationRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the element count of every tensor produced by any aten op run inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self.numels: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numels.append((str(func), t.numel()))
        return out

    def largest(self) -> tuple[str, int]:
        return max(self.numels, key=lambda item: item[1], default=("nothing", 0))
