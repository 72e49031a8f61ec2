"""Loss modules: MMTSLoss (schedule + cluster sizes looked up by dataset index) and ContrastiveLoss (fixed,
learnable open_clip-style, or DySTreSS temperature) against the functional API, under torch.compile, bad inputs."""
from __future__ import annotations

import math

import pytest
import torch

import mmts_kernels as mk
from mmts_kernels import modules
from mmts_kernels.amcl import AMCLLoss
from mmts_kernels.clusters import clusters_from_labels
from mmts_kernels.modules import ContrastiveLoss, MMTSLoss
from mmts_kernels.schedules import mmts_temperature

SIZES = torch.tensor([3, 50, 7, 7, 120, 1, 3, 64, 9, 2, 31, 5])  # cluster size of each of 12 training samples


def batch(N=5, D=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, D, generator=g, dtype=dtype).requires_grad_(),
            torch.randn(N, D, generator=g, dtype=dtype).requires_grad_())


@pytest.mark.parametrize("loss,hardest", [("infonce", False), ("max_margin", False), ("max_margin", True)])
def test_mmts_loss_equals_functional_with_training_set_extremes(loss, hardest):
    x, y = batch()
    index = torch.tensor([4, 0, 9, 7, 2])  # the batch's own sizes span [3, 120]; the training set's [1, 120]
    crit = MMTSLoss(SIZES, total_steps=1000, alpha=0.2, shift_min=0.17, shift_max=0.30, loss=loss,
                    hardest_negative=hardest)
    for step in (0, 130, 777):
        value = mmts_temperature(step, 200, SIZES[index], 0.2, 0.17, 0.30, n_min=1, n_max=120)
        kw = {"temperature": value} if loss == "infonce" else {"margin": value}
        want = mk.contrastive_loss(x, y, loss=loss, hardest_negative=hardest, **kw)
        torch.testing.assert_close(crit(x, y, step=step, index=index), want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(crit.values(step, index), value, rtol=1e-6, atol=1e-7)


def test_mmts_loss_from_clusters_whole_dataset_and_warmup():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    crit = MMTSLoss(clusters_from_labels(labels), period=100, warmup_steps=10, warmup_start=0.5)
    assert crit.cluster_sizes.tolist() == [2, 2, 1, 3, 3, 3]
    torch.testing.assert_close(crit.values(0), torch.full((6,), 0.5))
    schedule = mmts_temperature(5, 100, crit.cluster_sizes, n_min=1, n_max=3)
    torch.testing.assert_close(crit.values(5), 0.5 + 0.5 * (schedule - 0.5))
    torch.testing.assert_close(crit.values(40), mmts_temperature(40, 100, crit.cluster_sizes, n_min=1, n_max=3))
    x, y = batch(N=6)
    assert torch.isfinite(crit(x, y, step=3))  # the whole dataset as one batch: index may be omitted


def test_mmts_loss_state_dict_round_trip_and_gradients():
    crit = MMTSLoss(SIZES, total_steps=500)
    clone = MMTSLoss(torch.ones(12, dtype=torch.long), total_steps=500)
    clone.load_state_dict(crit.state_dict())
    torch.testing.assert_close(clone.values(17), crit.values(17))
    x, y = batch()
    crit(x, y, step=1, index=torch.arange(5)).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_contrastive_loss_fixed_per_sample_and_dystress():
    x, y = batch()
    torch.testing.assert_close(ContrastiveLoss(0.1)(x, y), mk.info_nce(x, y, 0.1))
    tau = torch.linspace(0.05, 0.5, 5, dtype=torch.float64)
    torch.testing.assert_close(ContrastiveLoss(tau)(x, y), mk.info_nce(x, y, tau))
    dy = mk.DySTreSS(0.07, 0.2)
    torch.testing.assert_close(ContrastiveLoss(temperature=dy, normalize=True)(x, y),
                               mk.info_nce(x, y, dy, normalize=True))
    m = torch.full((5,), 0.3, dtype=torch.float64)
    torch.testing.assert_close(ContrastiveLoss(loss="max_margin", margin=m, hardest_negative=True)(x, y),
                               mk.max_margin(x, y, m, hardest_negative=True))
    targets = torch.tensor([1, 0, 2])
    torch.testing.assert_close(ContrastiveLoss(0.2, symmetric=False)(x[:3], y, targets),
                               mk.info_nce(x[:3], y, 0.2, symmetric=False, targets=targets))


def test_learnable_temperature_is_log_parameterized_and_clamped():
    x, y = batch(dtype=torch.float32)
    crit = ContrastiveLoss(0.07, learnable_temperature=True)
    assert isinstance(crit.logit_scale, torch.nn.Parameter)
    assert float(crit.logit_scale.detach()) == pytest.approx(math.log(1 / 0.07))
    torch.testing.assert_close(crit(x, y), mk.info_nce(x, y, 0.07))
    crit(x, y).backward()
    assert crit.logit_scale.grad is not None and float(crit.logit_scale.grad) != 0.0
    with torch.no_grad():
        crit.logit_scale.fill_(10.0)  # an optimizer step pushed 1/τ = e^10 past 100
    crit.logit_scale.grad = None
    crit(x, y).backward()  # as open_clip: the parameter itself is clamped (here at the next forward) ...
    assert float(crit.logit_scale.detach()) == pytest.approx(math.log(100))
    assert float(crit.temperature.detach()) == pytest.approx(0.01)
    assert float(crit.logit_scale.grad) != 0.0  # ... and its gradient stays alive, so it can move back


@pytest.mark.parametrize("tau", [0.005, 2.0])
def test_learnable_temperature_must_start_inside_the_clamp(tau):
    with pytest.raises(ValueError, match="temperature"):
        ContrastiveLoss(tau, learnable_temperature=True)


def test_process_group_is_forwarded(monkeypatch):
    seen = []
    monkeypatch.setattr(modules, "contrastive_loss", lambda *a, **kw: seen.append(kw["process_group"]))
    x, y = batch()
    group = object()
    ContrastiveLoss(process_group=group)(x, y)
    MMTSLoss(SIZES, total_steps=10, process_group=group)(x, y, step=0, index=torch.arange(5))
    assert seen == [group, group]


@pytest.mark.parametrize("make,exc,word", [
    (lambda: MMTSLoss(SIZES), ValueError, "total_steps"),
    (lambda: MMTSLoss(SIZES, total_steps=10, period=2), ValueError, "total_steps"),
    (lambda: MMTSLoss(SIZES, total_steps=0), ValueError, "total_steps"),
    (lambda: MMTSLoss(SIZES.tolist(), total_steps=10), TypeError, "cluster_sizes"),
    (lambda: MMTSLoss(SIZES.view(3, 4), total_steps=10), ValueError, "cluster_sizes"),
    (lambda: MMTSLoss(-SIZES, total_steps=10), ValueError, "cluster_sizes"),
    (lambda: MMTSLoss(SIZES, total_steps=10, loss="triplet"), ValueError, "loss"),
    (lambda: MMTSLoss(SIZES, total_steps=10, warmup_steps=5), ValueError, "warmup_start"),
    (lambda: MMTSLoss(SIZES, total_steps=10, alpha=-1.0), ValueError, "alpha"),
    (lambda: MMTSLoss(SIZES, total_steps=10, shift_min=0.3, shift_max=0.1), ValueError, "shift_min"),
    (lambda: ContrastiveLoss(mk.DySTreSS(), learnable_temperature=True), ValueError,
     r"learnable_temperature=True learns one scalar temperature.*DySTreSS"),
    (lambda: ContrastiveLoss(torch.full((4,), 0.1), learnable_temperature=True), ValueError, "one scalar"),
    (lambda: ContrastiveLoss("0.1", learnable_temperature=True), TypeError, "initial"),
    (lambda: ContrastiveLoss(0.1, learnable_temperature=True, loss="max_margin"), ValueError,
     "learnable_temperature"),
    (lambda: ContrastiveLoss(0.0, learnable_temperature=True), ValueError, "temperature"),
    (lambda: ContrastiveLoss(torch.ones(2, 3)), ValueError, "temperature"),
    (lambda: ContrastiveLoss(max_logit_scale=0.5), ValueError, "max_logit_scale"),
    (lambda: ContrastiveLoss(learnable_temperature=1), TypeError, "learnable_temperature"),
])
def test_bad_construction(make, exc, word):
    with pytest.raises(exc, match=word):
        make()


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(), ValueError, "index"),
    (dict(index=torch.tensor([0, 1, 2, 3, 12])), ValueError, "index"),
    (dict(index=torch.tensor([0, 1, 2, 3, -1])), ValueError, "index"),
    (dict(index=torch.zeros(5)), TypeError, "index"),
    (dict(index=[0, 1, 2, 3, 4]), TypeError, "index"),
    (dict(index=torch.arange(4)), ValueError, "temperature"),  # one value per batch sample
    (dict(index=torch.arange(5), step="1"), TypeError, "step"),
])
def test_bad_forward(kwargs, exc, word):
    x, y = batch()
    kwargs.setdefault("step", 0)
    with pytest.raises(exc, match=word):
        MMTSLoss(SIZES, total_steps=10)(x, y, **kwargs)
    with pytest.raises(ValueError, match="temperature"):
        ContrastiveLoss(0.0)(x, y)


# -- torch.compile ------------------------------------------------------------------------------------------------
# The whole path (module → validation → backend choice → statistics → loss) traces as one graph: fullgraph=True.
# The fused backends' own compile tests live with them (test_cpp.py, test_triton.py).

def _compile_and_compare(module, call, *, fullgraph=True, backend="eager"):
    compiled = torch.compile(module, fullgraph=fullgraph, backend=backend)
    for args, kw in call:
        torch.testing.assert_close(compiled(*args, **kw), module(*args, **kw), rtol=1e-5, atol=1e-6)


def test_modules_under_torch_compile_aot_autograd():
    """Forward and backward through AOTAutograd (what inductor consumes; inductor's own codegen is left out to keep
    the suite fast: it adds ~30 s on 2 cores and nothing specific to these modules)."""
    torch._dynamo.reset()
    x, y = batch(dtype=torch.float32)
    idx = torch.tensor([4, 0, 9, 7, 2])
    crit = MMTSLoss(SIZES, total_steps=100, backend="torch")
    compiled = torch.compile(crit, backend="aot_eager", fullgraph=True)
    for step in (torch.tensor(3), torch.tensor(40)):
        out = compiled(x, y, step=step, index=idx)
        torch.testing.assert_close(out, crit(x, y, step=int(step), index=idx), rtol=1e-5, atol=1e-6)
        gx, = torch.autograd.grad(out, x)
        want, = torch.autograd.grad(crit(x, y, step=int(step), index=idx), x)
        torch.testing.assert_close(gx, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["mmts_int_steps", "learnable", "fixed_float", "dystress", "amcl"])
def test_modules_under_torch_compile_eager_backend(name):
    torch._dynamo.reset()
    x, y = batch(dtype=torch.float32)
    if name == "mmts_int_steps":  # a Python int step: one recompile (0 → dynamic), then no more
        crit = MMTSLoss(SIZES, total_steps=100, loss="max_margin", backend="torch")
        calls = [((x, y), dict(step=s, index=torch.arange(5))) for s in (0, 1, 2, 3)]
    elif name == "fixed_float":  # Python-float τ and margin: their validation must not break the graph
        crit = ContrastiveLoss(0.07, loss="max_margin", margin=0.3, backend="torch")
        calls = [((x, y), {})]
    elif name == "learnable":
        crit, calls = ContrastiveLoss(learnable_temperature=True, backend="torch"), [((x, y), {})]
    elif name == "dystress":
        crit, calls = ContrastiveLoss(mk.DySTreSS(), normalize=True, backend="torch"), [((x, y), {})]
    else:
        crit, calls = AMCLLoss(4, backend="torch"), [((x.unsqueeze(0), y.unsqueeze(0)), {})]  # published form
    _compile_and_compare(crit, calls)
