"""``mmts_kernels.integrations.open_clip.ClipLoss`` and ``SigLipLoss`` against open_clip's own classes from the
open-clip-torch package: loss and every gradient (image and text features, logit_scale, logit_bias) to 1e-12 in
float64, on one process per backend and in groups of 2 gloo processes for each of open_clip's distributed settings
(ClipLoss's flags, SigLipLoss's exchanges); the arguments they refuse.

open_clip's ``loss.py`` is loaded by file path (``bench.competitors.open_clip_loss_module``, which the benchmark's
open_clip rows use too): ``import open_clip`` needs torchvision, which the CPU test environment lacks, while loss.py
needs only torch. Without open-clip-torch the comparisons skip with that reason, except under CI=true (the Makefile
installs it there), where they fail.
"""
from __future__ import annotations

import datetime
import functools
import math
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from mmts_kernels.integrations.open_clip import ClipLoss, SigLipLoss
from mmts_kernels.temperature import MAX_TEMPERATURE
from support import backend_marker, in_ci

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` is not an installed package
from bench.competitors import OPEN_CLIP_MISSING, open_clip_loss_module  # noqa: E402  (one loader of loss.py)

TOL = 1e-12  # float64, relative (DESIGN §6)
ULP = torch.finfo(torch.float64).eps
CPU_BACKENDS = ["torch", pytest.param("cpp", marks=backend_marker("cpp"))]


@pytest.fixture(scope="module")
def oc():
    module = open_clip_loss_module()
    if module is None:
        if in_ci():
            pytest.fail(f"{OPEN_CLIP_MISSING}; CI must test against it (the Makefile's install recipe installs it)")
        pytest.skip(OPEN_CLIP_MISSING)
    return module


def features(N: int, D: int, seed: int, dtype=torch.float64):
    """Unit-norm random embeddings, as open_clip's models return them."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(N, D, generator=g, dtype=dtype), dim=1)
    y = F.normalize(torch.randn(N, D, generator=g, dtype=dtype), dim=1)
    return x, y


def value_and_grads(loss_module, x, y, scale, bias=None, **kw):
    """The loss and its gradients with respect to the features, the (exp'd) logit scale and the bias."""
    leaves = [x.clone().requires_grad_(), y.clone().requires_grad_(),
              torch.tensor(scale, dtype=x.dtype, requires_grad=True)]
    if bias is not None:
        leaves.append(torch.tensor(bias, dtype=x.dtype, requires_grad=True))
    out = loss_module(*leaves[:3], *leaves[3:], **kw)
    loss = out["contrastive_loss"] if isinstance(out, dict) else out
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), dict(zip(("image", "text", "logit_scale", "logit_bias"), grads))


def clip_terms(scale: float, n: int) -> dict:
    """The size of the terms ClipLoss's loss and gradients are differences of (``assert_close``).

    Where the softmax saturates (a large scale, D = 1) the exact loss and gradients fall far below the terms whose
    difference they are (lse_i − s·S_ii for the loss, p_ij − δ_ij in the gradients), and every float64 evaluation,
    open_clip's included, carries the rounding of those terms. With unit-norm features (|S_ij| ≤ 1) they are at
    most s + log n (loss), 2s (the features' gradients: s/2n · Σ_j |p_ij − δ_ij| · |y_j| per row and column) and 2
    (logit_scale's and logit_bias's: Σ_j p_ij S_ij − S_ii and Σ_j p_ij − 1 per row and column, averaged)."""
    return {"loss": scale + math.log(n), "image": 2 * scale, "text": 2 * scale, "logit_scale": 2.0,
            "logit_bias": 2.0}


def siglip_terms(scale: float, bias: float, n: int) -> dict:
    """The same for SigLipLoss. Each logit u_ij = s·S_ij + b (|u| ≤ U = s + |b| with unit-norm features) is rounded
    to ulps of U in any evaluation. The loss, ∂/∂b and ∂/∂s are (1/n)·Σ over n² pairs of softplus(−z u) ≤ U + 1,
    of σ(−z u) S_ij or of z σ(−z u) (whose signs differ, so they may cancel): at most n·(U + 1) in size. A feature
    row's gradient is s/n · Σ_j σ(·)·y_j, each σ carrying the rounding of its u: s·(U + 1) per row, at most
    n·s·(U + 1) over the n rows."""
    big = scale + abs(bias) + 1.0
    return {"loss": n * big, "image": n * scale * big, "text": n * scale * big, "logit_scale": n * big,
            "logit_bias": n * big}


def assert_close(name: str, a: torch.Tensor, b: torch.Tensor, terms: dict) -> None:
    """``a`` against ``b`` to TOL relative or, where ``b`` is tiny, to 16 ulps of the terms it is formed from
    (``terms[name]``, from ``clip_terms`` or ``siglip_terms``)."""
    a, b = a.detach().double(), b.detach().double()
    err, allowed = (a - b).norm().item(), max(TOL * b.norm().item(), 16 * ULP * terms[name])
    assert err <= allowed, f"{name}: |error| {err:.3e} > {allowed:.3e} (|ref| {b.norm().item():.3e})"


def assert_matches(got, want, terms: dict) -> None:
    """The loss and every gradient of ``value_and_grads``, ``got`` against ``want``."""
    (loss, grads), (ref_loss, ref_grads) = got, want
    assert loss.dtype == ref_loss.dtype and loss.shape == ref_loss.shape == ()
    assert grads.keys() == ref_grads.keys()
    assert_close("loss", loss, ref_loss, terms)
    for name in ref_grads:
        assert_close(name, grads[name], ref_grads[name], terms)


# ---------------------------------------------------------------------------------------------------------------
# One process.

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(N=st.integers(2, 13), D=st.integers(1, 9), scale=st.floats(1.0, 100.0), seed=st.integers(0, 2 ** 16))
def test_matches_open_clip(oc, backend, N, D, scale, seed):
    x, y = features(N, D, seed)
    assert_matches(value_and_grads(ClipLoss(backend=backend), x, y, scale),
                   value_and_grads(oc.ClipLoss(), x, y, scale), clip_terms(scale, N))


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=backend_marker("triton"))])
def test_matches_open_clip_triton(oc, backend):
    x, y = features(5, 3, seed=7)  # tiny: Triton's interpreter on the CPU
    assert_matches(value_and_grads(ClipLoss(backend=backend), x, y, 14.3),
                   value_and_grads(oc.ClipLoss(), x, y, 14.3), clip_terms(14.3, 5))


@pytest.mark.parametrize("scale", [1.0, 1 / 0.07, 100.0])
def test_logit_scale_is_a_scale_not_a_temperature(oc, scale):
    """mk.info_nce refuses a temperature above MAX_TEMPERATURE (a logit scale passed by mistake); ClipLoss passes
    τ = 1/logit_scale, so open_clip's whole range of scales, [1, 100], works and matches."""
    x, y = features(9, 6, seed=3)
    assert_matches(value_and_grads(ClipLoss(), x, y, scale), value_and_grads(oc.ClipLoss(), x, y, scale),
                   clip_terms(scale, 9))
    plain = ClipLoss()(x, y, scale)  # a Python number as well as a tensor
    assert_close("loss", plain, oc.ClipLoss()(x, y, scale), clip_terms(scale, 9))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_and_low_precision(oc, backend):
    """open_clip's parameter is float32 while features may be float64 (it multiplies by the float32 value exactly)
    or float32 (then the DESIGN §6 bar, 1e-5, against open_clip in float64)."""
    x, y = features(16, 8, seed=5)
    scale32 = torch.tensor(1 / 0.07, dtype=torch.float32)
    for ours in (ClipLoss(backend=backend)(x, y, scale32), ClipLoss(backend=backend)(x, y, scale32.double())):
        assert_close("loss", ours, oc.ClipLoss()(x, y, scale32), clip_terms(14.3, 16))
    got = value_and_grads(ClipLoss(backend=backend), x.float(), y.float(), float(scale32))
    (want_loss, want) = value_and_grads(oc.ClipLoss(), x.float().double(), y.float().double(), float(scale32))
    assert got[0].dtype == torch.float32
    for name, a, b in [("loss", got[0], want_loss)] + [(k, got[1][k], want[k]) for k in want]:
        assert (a.double() - b).norm() <= 1e-5 * b.norm(), name


def test_a_temperature_passed_as_logit_scale_is_refused():
    x, y = features(4, 3, seed=0)
    for tau in (0.07, torch.tensor(0.07)):
        with pytest.raises(ValueError, match=r"logit_scale = 0\.07 .*looks like a temperature"):
            ClipLoss()(x, y, tau)
    ClipLoss()(x, y, 1 / MAX_TEMPERATURE)  # the smallest scale mk's temperature bound admits


def test_output_dict_and_logit_bias(oc):
    x, y = features(6, 4, seed=11)
    got = value_and_grads(ClipLoss(), x, y, 20.0, bias=-3.5, output_dict=True)
    want = value_and_grads(oc.ClipLoss(), x, y, 20.0, bias=-3.5, output_dict=True)
    assert_matches(got, want, clip_terms(20.0, 6))
    # softmax cancels a bias shared by every logit: its gradient is exactly 0 here (0 up to rounding in open_clip)
    assert got[1]["logit_bias"].item() == 0.0
    out = ClipLoss()(x, y, 20.0, output_dict=True)
    assert list(out) == ["contrastive_loss"] and out["contrastive_loss"].shape == ()
    assert_close("loss", ClipLoss()(x, y, 20.0, 1.5), oc.ClipLoss()(x, y, 20.0, 1.5), clip_terms(20.0, 6))


def test_gradient_reaches_open_clips_parameter(oc):
    """The call open_clip makes, logit_scale = model.logit_scale.exp(): the log-scale parameter gets its gradient."""
    x, y = features(8, 5, seed=2)
    grads = []
    for loss_module in (ClipLoss(), oc.ClipLoss()):
        log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07), dtype=torch.float64))
        loss_module(x, y, log_scale.exp()).backward()
        grads.append(log_scale.grad)
    assert grads[0] != 0
    assert_close("logit_scale", grads[0] / (1 / 0.07), grads[1] / (1 / 0.07), clip_terms(1 / 0.07, 8))


def test_open_clip_arguments_are_kept():
    loss = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=1, world_size=4)
    assert (loss.local_loss, loss.gather_with_grad, loss.cache_labels, loss.rank, loss.world_size,
            loss.use_horovod, loss.backend) == (True, True, True, 1, 4, False, "auto")
    # Outside a process group open_clip ignores the gather flags; so does this one.
    x, y = features(5, 3, seed=1)
    torch.testing.assert_close(ClipLoss(local_loss=True)(x, y, 10.0), ClipLoss()(x, y, 10.0), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(use_horovod=True), ValueError, "use_horovod"),
    (dict(local_loss=True, gather_with_grad=False, world_size=2), ValueError, "gather_with_grad"),
    (dict(world_size=0), ValueError, "world_size"),
    (dict(rank=2, world_size=2), ValueError, "rank"),
    (dict(rank=-1), ValueError, "rank"),
    (dict(world_size=2.0), TypeError, "world_size"),
    (dict(local_loss=1), TypeError, "local_loss"),
    (dict(cache_labels="yes"), TypeError, "cache_labels"),
    (dict(backend="cuda"), ValueError, "backend"),
])
def test_refused_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ClipLoss(**kwargs)


@pytest.mark.parametrize("args,kwargs,error,match", [
    ((0.0,), {}, ValueError, "logit_scale must be finite and > 0"),
    ((-14.3,), {}, ValueError, "logit_scale must be finite and > 0"),
    ((float("nan"),), {}, ValueError, "logit_scale"),
    ((torch.tensor(float("inf")),), {}, ValueError, "logit_scale must be finite"),
    ((torch.tensor([14.3, 14.3]),), {}, ValueError, "logit_scale must be a number or a one-element tensor"),
    ((torch.tensor(14),), {}, TypeError, "logit_scale"),
    (("14.3",), {}, TypeError, "logit_scale"),
    ((14.3, torch.zeros(4)), {}, ValueError, "logit_bias"),
    ((14.3, "0"), {}, TypeError, "logit_bias"),
    ((14.3,), dict(output_dict=1), TypeError, "output_dict"),
])
def test_refused_call_arguments(args, kwargs, error, match):
    x, y = features(4, 3, seed=0, dtype=torch.float32)
    with pytest.raises(error, match=match):
        ClipLoss()(x, y, *args, **kwargs)


@pytest.mark.parametrize("x_shape,y_shape,match", [
    ((2, 4, 3), (2, 4, 3), "image_features must be"),
    ((4, 3), (5, 3), "same number of pairs"),
])
def test_refused_feature_shapes(x_shape, y_shape, match):
    with pytest.raises(ValueError, match=match):
        ClipLoss()(torch.randn(x_shape), torch.randn(y_shape), 10.0)


def test_world_size_needs_torch_distributed():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("torch.distributed is initialized in this process")
    x, y = features(4, 3, seed=0)
    with pytest.raises(ValueError, match="world_size=2: torch.distributed is not initialized"):
        ClipLoss(local_loss=True, gather_with_grad=True, world_size=2)(x, y, 10.0)


# ---------------------------------------------------------------------------------------------------------------
# SigLipLoss, one process.

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(N=st.integers(2, 13), D=st.integers(1, 9), scale=st.floats(1.0, 100.0), bias=st.floats(-15.0, 5.0),
       seed=st.integers(0, 2 ** 16))
def test_siglip_matches_open_clip(oc, backend, N, D, scale, bias, seed):
    x, y = features(N, D, seed)
    assert_matches(value_and_grads(SigLipLoss(backend=backend), x, y, scale, bias),
                   value_and_grads(oc.SigLipLoss(), x, y, scale, bias), siglip_terms(scale, bias, N))


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=backend_marker("triton"))])
def test_siglip_matches_open_clip_triton(oc, backend):
    x, y = features(5, 3, seed=8)  # tiny: Triton's interpreter on the CPU
    assert_matches(value_and_grads(SigLipLoss(backend=backend), x, y, 10.0, -10.0),
                   value_and_grads(oc.SigLipLoss(), x, y, 10.0, -10.0), siglip_terms(10.0, -10.0, 5))


def test_siglip_without_bias_and_output_dict(oc):
    """open_clip adds no bias when logit_bias is None (its models without one); output_dict as open_clip's."""
    x, y = features(7, 4, seed=12)
    terms = siglip_terms(12.0, 0.0, 7)
    assert_matches(value_and_grads(SigLipLoss(), x, y, 12.0), value_and_grads(_with_none_bias(oc), x, y, 12.0),
                   terms)
    got = value_and_grads(SigLipLoss(), x, y, 12.0, -6.0, output_dict=True)
    assert_matches(got, value_and_grads(oc.SigLipLoss(), x, y, 12.0, -6.0, output_dict=True),
                   siglip_terms(12.0, -6.0, 7))
    out = SigLipLoss()(x, y, 12.0, -6.0, output_dict=True)
    assert list(out) == ["contrastive_loss"] and out["contrastive_loss"].shape == ()
    for scale, bias in ((12.0, -6.0), (torch.tensor([12.0]), torch.tensor([-6.0]))):  # numbers, [1] tensors
        assert_close("loss", SigLipLoss()(x, y, scale, bias), oc.SigLipLoss()(x, y, scale, bias),
                     siglip_terms(12.0, -6.0, 7))


def _with_none_bias(oc):
    """open_clip's SigLipLoss called with logit_bias=None (its forward takes the bias positionally)."""
    loss = oc.SigLipLoss()
    return lambda x, y, scale, **kw: loss(x, y, scale, None, **kw)


def test_siglip_gradient_reaches_open_clips_parameters(oc):
    """The call open_clip makes: logit_scale = model.logit_scale.exp() (log 10 at init) and model.logit_bias (−10),
    float32 parameters with float64 features; both parameters get open_clip's gradient."""
    x, y = features(8, 5, seed=4)
    grads = []
    for loss_module in (SigLipLoss(), oc.SigLipLoss()):
        log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
        bias = torch.nn.Parameter(torch.tensor(-10.0))
        loss_module(x, y, log_scale.exp(), bias).backward()
        grads.append((log_scale.grad, bias.grad))
    (ours_s, ours_b), (want_s, want_b) = grads
    assert ours_s.dtype == ours_b.dtype == torch.float32 and ours_s != 0 and ours_b != 0
    terms = siglip_terms(10.0, -10.0, 8)
    assert_close("logit_scale", ours_s / 10.0, want_s / 10.0, terms)
    assert_close("logit_bias", ours_b, want_b, terms)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_siglip_low_precision(oc, backend):
    """float32 features against open_clip in float64 on the same (float32-rounded) inputs: DESIGN §6's bar, 1e-5."""
    x, y = features(16, 8, seed=6)
    got = value_and_grads(SigLipLoss(backend=backend), x.float(), y.float(), 10.0, -10.0)
    want_loss, want = value_and_grads(oc.SigLipLoss(), x.float().double(), y.float().double(), 10.0, -10.0)
    assert got[0].dtype == torch.float32
    for name, a, b in [("loss", got[0], want_loss)] + [(k, got[1][k], want[k]) for k in want]:
        assert (a.double() - b).norm() <= 1e-5 * b.norm(), name


def test_siglip_arguments_are_kept():
    loss = SigLipLoss(cache_labels=True, rank=1, world_size=4, dist_impl="gather", chunk_size=512)
    assert (loss.cache_labels, loss.rank, loss.world_size, loss.dist_impl, loss.chunk_size, loss.backend) == (
        True, 1, 4, "gather", 512, "auto")
    assert SigLipLoss().dist_impl == "bidir"  # open_clip's default exchange
    x, y = features(5, 3, seed=1)
    torch.testing.assert_close(SigLipLoss(chunk_size=2)(x, y, 10.0, -5.0), SigLipLoss()(x, y, 10.0, -5.0),
                               rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(dist_impl="ring"), ValueError, "dist_impl"),
    (dict(dist_impl=1), ValueError, "dist_impl"),
    (dict(world_size=0), ValueError, "world_size"),
    (dict(rank=3, world_size=2), ValueError, "rank"),
    (dict(rank=1.0, world_size=2), TypeError, "rank"),
    (dict(cache_labels=None), TypeError, "cache_labels"),
    (dict(chunk_size=-1), ValueError, "chunk_size"),
    (dict(backend="gpu"), ValueError, "backend"),
])
def test_siglip_refused_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SigLipLoss(**kwargs)


@pytest.mark.parametrize("args,kwargs,error,match", [
    ((0.1, -10.0), {}, ValueError, r"logit_scale = 0\.1 .*looks like a temperature.*SigLipLoss takes"),
    ((-10.0, -10.0), {}, ValueError, "logit_scale must be finite and > 0"),
    ((torch.tensor([10.0, 10.0]), -10.0), {}, ValueError, "logit_scale must be a number or a one-element tensor"),
    ((10.0, torch.full((4,), -10.0)), {}, ValueError, "logit_bias must be None, a number or a one-element tensor"),
    ((10.0, torch.tensor(-10)), {}, TypeError, "logit_bias must be a floating-point tensor"),
    ((10.0, "-10"), {}, TypeError, "logit_bias"),
    ((10.0, -10.0), dict(output_dict="yes"), TypeError, "output_dict"),
])
def test_siglip_refused_call_arguments(args, kwargs, error, match):
    x, y = features(4, 3, seed=0, dtype=torch.float32)
    with pytest.raises(error, match=match):
        SigLipLoss()(x, y, *args, **kwargs)


def test_siglip_refused_feature_shapes_and_world_size():
    with pytest.raises(ValueError, match="same number of pairs"):
        SigLipLoss()(torch.randn(4, 3), torch.randn(5, 3), 10.0, -10.0)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("torch.distributed is initialized in this process")
    x, y = features(4, 3, seed=0)
    with pytest.raises(ValueError, match="world_size=2: torch.distributed is not initialized"):
        SigLipLoss(rank=1, world_size=2)(x, y, 10.0, -10.0)


# ---------------------------------------------------------------------------------------------------------------
# Distributed: every case runs in one group of 2 gloo processes, open_clip's class beside ours.

WORLD = 2
D = 4
SPAWN_TIMEOUT_S = 240
SETTINGS = ((True, True), (False, True), (False, False))  # (local_loss, gather_with_grad); the 4th is refused


@dataclass(frozen=True)
class DistCase:
    local_loss: bool
    gather_with_grad: bool
    backend: str
    sizes: tuple  # local batch size of each rank; open_clip runs beside ours only when they are equal
    scale: float
    seed: int

    @property
    def name(self) -> str:
        flags = f"local{int(self.local_loss)}-gwg{int(self.gather_with_grad)}"
        return f"{flags}-{self.backend}-{'x'.join(map(str, self.sizes))}"

    @property
    def equal(self) -> bool:
        return len(set(self.sizes)) == 1

    def run(self, rank: int, open_clip_loss) -> dict:
        """This rank's value and gradients, ours and (equal batches) open_clip's."""
        x, y = global_batch(self)
        rows = slice(sum(self.sizes[:rank]), sum(self.sizes[: rank + 1]))
        flags = dict(local_loss=self.local_loss, gather_with_grad=self.gather_with_grad, rank=rank,
                     world_size=WORLD)
        result = {"ours": value_and_grads(ClipLoss(backend=self.backend, **flags), x[rows], y[rows], self.scale)}
        if self.equal and open_clip_loss is not None:
            result["open_clip"] = value_and_grads(open_clip_loss.ClipLoss(**flags), x[rows], y[rows], self.scale)
        return result


@dataclass(frozen=True)
class SigDistCase:
    dist_impl: str  # open_clip's exchange; ours does the same ring whatever it is
    backend: str
    sizes: tuple
    scale: float
    bias: float
    seed: int

    @property
    def name(self) -> str:
        return f"siglip-{self.dist_impl}-{self.backend}-{'x'.join(map(str, self.sizes))}"

    @property
    def equal(self) -> bool:
        return len(set(self.sizes)) == 1

    def run(self, rank: int, open_clip_loss) -> dict:
        x, y = global_batch(self)
        rows = slice(sum(self.sizes[:rank]), sum(self.sizes[: rank + 1]))
        args = dict(rank=rank, world_size=WORLD, dist_impl=self.dist_impl)
        result = {"ours": value_and_grads(SigLipLoss(backend=self.backend, **args), x[rows], y[rows], self.scale,
                                          self.bias)}
        if self.equal and open_clip_loss is not None:
            result["open_clip"] = value_and_grads(open_clip_loss.SigLipLoss(**args), x[rows], y[rows], self.scale,
                                                  self.bias)
        return result


DIST_CASES = [DistCase(local, gwg, backend, sizes, scale=10.0 + 7 * i, seed=i)
              for i, ((local, gwg), backend, sizes) in enumerate(
                  (s, b, z) for s in SETTINGS for b in ("torch", "cpp") for z in ((3, 3), (2, 4)))]
# Every exchange of open_clip on equal batches; unequal ones (open_clip cannot send them) once per backend.
SIG_DIST_CASES = [SigDistCase(impl, backend, sizes, scale=5.0 + 9 * i, bias=-2.0 - i, seed=50 + i)
                  for i, (impl, backend, sizes) in enumerate(
                      [(impl, b, (3, 3)) for impl in SigLipLoss.DIST_IMPLS for b in ("torch", "cpp")]
                      + [("bidir", b, (2, 4)) for b in ("torch", "cpp")])]


def global_batch(case):
    return features(sum(case.sizes), D, seed=100 + case.seed)


def _worker(rank: int, tmpdir: str, cases: list) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmpdir}/rendezvous", rank=rank,
                                         world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        open_clip_loss = open_clip_loss_module()
        results = {}
        for case in cases:
            try:  # a case that fails on every rank alike fails alone
                results[case.name] = case.run(rank, open_clip_loss)
            except Exception:
                results[case.name] = {"error": traceback.format_exc()}
        torch.save(results, os.path.join(tmpdir, f"rank{rank}.pt"))
        # No rank tears the group down while another still finishes its last collective (that aborted the other
        # rank: "terminate called without an active exception").
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    import torch.multiprocessing as mp

    tmpdir = str(tmp_path_factory.mktemp("open_clip_dist"))
    context = mp.start_processes(_worker, args=(tmpdir, DIST_CASES + SIG_DIST_CASES), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=SPAWN_TIMEOUT_S)
    while not context.join(timeout=5):
        if datetime.datetime.now() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the group of {WORLD} processes did not finish within {SPAWN_TIMEOUT_S} s")
    return [torch.load(os.path.join(tmpdir, f"rank{r}.pt")) for r in range(WORLD)]


def _case_results(dist_results, case: DistCase) -> list:
    per_rank = [r[case.name] for r in dist_results]
    for rank, res in enumerate(per_rank):
        if "error" in res:
            pytest.fail(f"{case.name} raised on rank {rank}:\n{res['error']}", pytrace=False)
    return per_rank


def _dist_param(case: DistCase):
    return pytest.param(case, marks=backend_marker(case.backend) if case.backend != "torch" else (), id=case.name)


@pytest.mark.parametrize("case", [_dist_param(c) for c in DIST_CASES if c.equal])
def test_distributed_matches_open_clip_on_every_rank(oc, dist_results, case):
    """open_clip's ClipLoss run in the same processes: value and the gradients of x_r, y_r and logit_scale on each
    rank, before any averaging over ranks."""
    for res in _case_results(dist_results, case):
        assert "open_clip" in res, "open_clip's loss.py could not be loaded in the spawned processes"
        assert_matches(res["ours"], res["open_clip"], clip_terms(case.scale, sum(case.sizes)))


@pytest.mark.parametrize("case", [_dist_param(c) for c in DIST_CASES])
def test_distributed_against_one_process(oc, dist_results, case):
    """The module docstring's table against open_clip's loss of one process on the whole batch (L_single), with
    equal and with unequal local batches (which open_clip itself cannot gather): the features' gradients are W (or,
    without gather_with_grad, 1) times those of L_single; the mean over ranks of the values and of the logit_scale
    gradients is L_single's, and without local_loss every rank has them."""
    per_rank = _case_results(dist_results, case)
    x, y = global_batch(case)
    ref_loss, ref = value_and_grads(oc.ClipLoss(), x, y, case.scale)
    factor = WORLD if case.gather_with_grad else 1
    offsets = [sum(case.sizes[:r]) for r in range(WORLD + 1)]
    close = functools.partial(assert_close, terms=clip_terms(case.scale, sum(case.sizes)))
    for rank, res in enumerate(per_rank):
        loss, grads = res["ours"]
        rows = slice(offsets[rank], offsets[rank + 1])
        for key in ("image", "text"):
            close(key, grads[key] / factor, ref[key][rows])
        if not case.local_loss:
            close("loss", loss, ref_loss)
            close("logit_scale", grads["logit_scale"], ref["logit_scale"])
    close("loss", torch.stack([res["ours"][0] for res in per_rank]).mean(), ref_loss)
    close("logit_scale", torch.stack([res["ours"][1]["logit_scale"] for res in per_rank]).mean(), ref["logit_scale"])


@pytest.mark.parametrize("case", [_dist_param(c) for c in SIG_DIST_CASES if c.equal])
def test_siglip_distributed_matches_open_clip_on_every_rank(oc, dist_results, case):
    """open_clip's SigLipLoss with the same dist_impl in the same processes: each rank's value (its anchors against
    every rank's texts, ÷ the local batch) and the gradients each rank's backward leaves in x_r, y_r, logit_scale
    and logit_bias, before any averaging over ranks."""
    for res in _case_results(dist_results, case):
        assert "open_clip" in res, "open_clip's loss.py could not be loaded in the spawned processes"
        assert_matches(res["ours"], res["open_clip"], siglip_terms(case.scale, case.bias, sum(case.sizes)))


@pytest.mark.parametrize("case", [_dist_param(c) for c in SIG_DIST_CASES])
def test_siglip_distributed_against_one_process(oc, dist_results, case):
    """The module docstring's SigLipLoss rule against open_clip's loss of one process on the whole batch
    (L_single), equal and unequal local batches: the features' gradients are W times L_single's; the mean over
    ranks of the values and of the logit_scale and logit_bias gradients is L_single's."""
    per_rank = _case_results(dist_results, case)
    x, y = global_batch(case)
    ref_loss, ref = value_and_grads(oc.SigLipLoss(), x, y, case.scale, case.bias)
    offsets = [sum(case.sizes[:r]) for r in range(WORLD + 1)]
    close = functools.partial(assert_close, terms=siglip_terms(case.scale, case.bias, sum(case.sizes)))
    for rank, res in enumerate(per_rank):
        rows = slice(offsets[rank], offsets[rank + 1])
        for key in ("image", "text"):
            close(key, res["ours"][1][key] / WORLD, ref[key][rows])
    close("loss", torch.stack([res["ours"][0] for res in per_rank]).mean(), ref_loss)
    for key in ("logit_scale", "logit_bias"):
        close(key, torch.stack([res["ours"][1][key] for res in per_rank]).mean(), ref[key])
