"""Every bad input of DESIGN §7 raises ValueError/TypeError naming the argument, before any backend runs."""
from __future__ import annotations

import math

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


# Tensors that are not dense and strided: each used to pass validation and fail inside torch or a kernel.
LAYOUTS = {
    "sparse_coo": lambda t: t.to_sparse(),
    "sparse_csr": lambda t: t.to_sparse_csr(),  # 2-D tensors only
    "mkldnn": lambda t: t.to_mkldnn(),  # float32 only
    "nested": lambda t: torch.nested.nested_tensor([t]),
    "jagged": lambda t: torch.nested.nested_tensor([t], layout=torch.jagged),
}
LAYOUT_CASES = [
    # (argument, layout, kwargs of contrastive_loss with the argument replaced by that layout)
    *[("x", layout, lambda f: dict(x=f(x4), y=y4)) for layout in LAYOUTS],
    *[("y", layout, lambda f: dict(x=x4, y=f(y4))) for layout in LAYOUTS],
    *[("temperature", layout, lambda f: dict(x=x4, y=y4, temperature=f(torch.full((4,), 0.1))))
      for layout in ("sparse_coo", "mkldnn", "nested", "jagged")],
    ("temperature", "sparse_csr",
     lambda f: dict(x=x4[None], y=y4[None], temperature=f(torch.full((1, 4), 0.1)))),  # [H, N]
    *[("margin", layout, lambda f: dict(x=x4, y=y4, loss="max_margin", margin=f(torch.full((4,), 0.2))))
      for layout in ("sparse_coo", "mkldnn", "nested")],
    *[("targets", layout, lambda f: dict(x=x4, y=y5, symmetric=False, targets=f(torch.arange(4))))
      for layout in ("sparse_coo", "nested")],
]


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
@pytest.mark.parametrize("name,layout,make", LAYOUT_CASES, ids=[f"{n}-{lay}" for n, lay, _ in LAYOUT_CASES])
def test_non_dense_tensors_are_refused_naming_the_argument(monkeypatch, name, layout, make):
    from mmts_kernels import reference

    monkeypatch.setattr(reference, "compute_stats", lambda *a, **k: pytest.fail("a backend ran"))
    with pytest.raises(TypeError, match=f"^{name} must be a dense"):
        mk.contrastive_loss(**make(LAYOUTS[layout]), backend="torch")


@pytest.mark.parametrize("call,name", [
    (lambda: mk.amcl_loss(x4.to_sparse(), y4, mk.AMCLTemperatureNet(3)), "z1"),
    (lambda: mk.AMCLLoss(3)(x4, y4, queue=torch.randn(6, 3).to_sparse()), "queue"),
    (lambda: mk.amcl_loss(x4, y5, mk.AMCLTemperatureNet(3), form="cross_modal", targets=torch.arange(4).to_sparse()),
     "targets"),
    (lambda: mk.ContrastiveLoss(torch.full((4,), 0.1).to_sparse()), "temperature"),
    (lambda: mk.ContrastiveLoss(loss="max_margin", margin=torch.full((4,), 0.2).to_mkldnn()), "margin"),
    (lambda: mk.MMTSLoss(torch.tensor([1, 2, 3, 4]).to_sparse(), total_steps=10), "cluster_sizes"),
    (lambda: mk.MMTSLoss(torch.tensor([1, 2, 3, 4]), total_steps=10)(x4, y4, step=0,
                                                                       index=torch.arange(4).to_sparse()), "index"),
    (lambda: mk.schedules.mmts_temperature(0, 10, torch.tensor([1.0, 2.0]).to_mkldnn(), n_min=1, n_max=2),
     "cluster_sizes"),
    (lambda: mk.schedules.mmts_temperature(0, 10, torch.tensor([1, 2]), n_min=torch.tensor(1).to_sparse(),
                                           n_max=2), "n_min"),
    (lambda: mk.schedules.mmts_temperature(torch.tensor(3.0).to_sparse(), 10, torch.tensor([1, 2]), n_min=1,
                                           n_max=2), "step"),
])
def test_other_entry_points_refuse_non_dense_tensors(call, name):
    with pytest.raises(TypeError, match=f"^{name} must be a dense"):
        call()


def test_meta_tensors_skip_value_checks_and_refuse_check_finite():
    """A meta tensor has a shape and no values: the checks on values (τ > 0, targets in range) are skipped, as
    while torch.compile traces, and check_finite=True, which needs the values, is refused."""
    meta4, meta5 = torch.empty(4, 3, device="meta"), torch.empty(5, 3, device="meta")
    out = mk.info_nce(meta4, meta5, torch.full((4,), 0.1, device="meta"), symmetric=False,
                      targets=torch.arange(4, device="meta"), reduction="none", backend="torch")
    assert out.device.type == "meta" and out.shape == (4,)
    with pytest.raises(ValueError, match="^check_finite=True .* meta"):
        mk.info_nce(meta4, meta4, check_finite=True, backend="torch")


def test_dystress_bounds_must_hold_in_the_compute_dtype():
    """τ_min = 1e-50 is > 0 in fp64 but 0 in fp32 (the loss was NaN); a scalar τ of 1e-50 is refused alike."""
    x64, y64 = x4.double(), y4.double()
    tiny = mk.DySTreSS(1e-50, 0.2)
    with pytest.raises(ValueError, match=r"^temperature \(DySTreSS tau_min\) must be finite and > 0 in torch.float32"):
        mk.info_nce(x4, y4, tiny, backend="torch")
    with pytest.raises(ValueError, match="tau_min"):
        mk.info_nce(x4.half(), y4.half(), tiny, backend="torch")
    assert torch.isfinite(mk.info_nce(x64, y64, tiny, backend="torch"))  # representable in fp64


LOGIT_SCALE = r"above 5: it looks like a logit scale .* 1 / logit_scale"


@pytest.mark.parametrize("temperature", [
    14.3, 100.0, 5.01, 1e300,
    torch.tensor(1 / 0.07),  # open_clip's model(...) returns logit_scale.exp(), ≈ 14.3
    torch.tensor(1 / 0.07, dtype=torch.float64, requires_grad=True),
    torch.tensor([0.1, 0.2, 6.0, 0.1]),  # any element above 5
    torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 50.0]]),  # [H, N]
], ids=["14.3", "100", "5.01", "1e300", "0dim", "0dim-grad", "per-sample", "per-head"])
def test_a_logit_scale_passed_as_temperature_is_refused(temperature):
    """CLIP code holds logit_scale = 1/τ (≈ 14.3 at init, up to 100); as a temperature it gave loss ≈ log N."""
    H = temperature.shape[0] if isinstance(temperature, torch.Tensor) and temperature.dim() == 2 else 1
    x, y = torch.randn(H, 4, 3, dtype=torch.float64), torch.randn(H, 4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"^temperature.*{LOGIT_SCALE}"):
        mk.info_nce(x, y, temperature, backend="torch")


def test_the_logit_scale_message_leads_to_the_right_loss():
    x, y = torch.randn(6, 3), torch.randn(6, 3)
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # open_clip's parameter: the log
    with pytest.raises(ValueError, match=LOGIT_SCALE):
        mk.info_nce(x, y, logit_scale.exp(), backend="torch")
    expected = mk.info_nce(x, y, 0.07, backend="torch")
    torch.testing.assert_close(mk.info_nce(x, y, 1 / logit_scale.exp(), backend="torch"), expected)
    torch.testing.assert_close(mk.info_nce(x, y, logit_scale.exp().reciprocal(), backend="torch"), expected)


@pytest.mark.parametrize("temperature", [5.0, 2.0, 1.0, torch.full((4,), 5.0), mk.DySTreSS(0.1, 5.0)],
                         ids=["5", "amcl-tau-max", "ts-tau-max", "per-sample-5", "dystress-5"])
def test_temperatures_up_to_the_bound_stay_legal(temperature):
    assert torch.isfinite(mk.info_nce(x4, y4, temperature, backend="torch"))


def test_max_temperature_is_one_constant_used_everywhere():
    from mmts_kernels import temperature, validation

    assert temperature.MAX_TEMPERATURE == 5.0 and validation.MAX_TEMPERATURE is temperature.MAX_TEMPERATURE


@pytest.mark.parametrize("call,name", [
    (lambda: mk.DySTreSS(0.1, 14.3), "DySTreSS: tau_max"),
    (lambda: mk.DySTreSS(6.0, 7.0), "DySTreSS: tau_min"),
    (lambda: mk.ContrastiveLoss(14.3), "temperature"),
    (lambda: mk.ContrastiveLoss(1 / 0.07, learnable_temperature=True), "temperature"),
])
def test_logit_scales_are_refused_where_temperatures_are_made(call, name):
    with pytest.raises(ValueError, match=f"^{name} = .*{LOGIT_SCALE}"):
        call()


def test_a_tensor_temperature_costs_one_device_sync(monkeypatch):
    """Every rule on a tensor τ (finite, > 0, ≤ 5) is read back in one sync: a learnable τ is checked per call."""
    from mmts_kernels.validation import validate

    syncs = []
    for method in ("__bool__", "__float__", "__int__", "item", "tolist"):
        real = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method,
                            lambda self, *a, _real=real, _m=method: syncs.append(_m) or _real(self, *a))
    tau = torch.full((4,), 0.1, requires_grad=True)
    validate(x4, y4, loss="infonce", temperature=tau, margin=0.2, hardest_negative=False, targets=None,
             symmetric=True, reduction="mean", check_finite=False, backend="torch", deterministic=None)
    assert syncs == ["__bool__"]
