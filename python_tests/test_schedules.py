"""Schedules (DESIGN §5): TS, MM-TS (temperature and margin), cluster shifts and the linear warm-up, at
hand-computed points and against the §5 formulas written out, over random arguments."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mmts_kernels.schedules import (cluster_shift, cosine_temperature, linear_warmup, mmts_margin,
                                    mmts_temperature)


def test_cosine_temperature_at_period_boundaries():
    assert cosine_temperature(0, 0.1, 1.0, 400) == pytest.approx(1.0, abs=1e-15)  # starts at τ_max
    assert cosine_temperature(100, 0.1, 1.0, 400) == pytest.approx(0.55, abs=1e-15)  # quarter: the middle
    assert cosine_temperature(200, 0.1, 1.0, 400) == pytest.approx(0.1, abs=1e-15)  # half: τ_min
    assert cosine_temperature(400, 0.1, 1.0, 400) == pytest.approx(1.0, abs=1e-15)  # full period: τ_max again
    assert cosine_temperature(600, 0.1, 1.0, 400) == pytest.approx(0.1, abs=1e-15)
    assert isinstance(cosine_temperature(3, 0.1, 1.0, 400), float)


@given(st.integers(0, 1000), st.floats(1.0, 500.0))
def test_cosine_temperature_half_period_is_the_official_ts_formula(epoch, t_max):
    # Official TS code: tau = tau_min + 0.5 (tau_max - tau_min)(1 + cos(pi * epoch / t_max)), t_max half a period.
    official = 0.1 + 0.5 * (1.0 - 0.1) * (1 + math.cos(math.pi * epoch / t_max))
    assert cosine_temperature(epoch, 0.1, 1.0, half_period=t_max) == pytest.approx(official, abs=1e-12)
    assert cosine_temperature(epoch, 0.1, 1.0, half_period=t_max) == cosine_temperature(epoch, 0.1, 1.0, 2 * t_max)


def test_cosine_temperature_official_ts_setting():
    # TS's setting: 0.1 -> 1.0, t_max = 200 epochs: tau_min at epoch 200, tau_max again at epoch 400.
    assert cosine_temperature(200, 0.1, 1.0, half_period=200) == pytest.approx(0.1, abs=1e-15)
    assert cosine_temperature(400, 0.1, 1.0, half_period=200) == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize("kwargs", [dict(), dict(period=400, half_period=200)])
def test_cosine_temperature_needs_exactly_one_period(kwargs):
    with pytest.raises(ValueError, match="exactly one of period"):
        cosine_temperature(0, 0.1, 1.0, **kwargs)


def test_cosine_temperature_half_period_checked():
    with pytest.raises(ValueError, match="half_period"):
        cosine_temperature(0, 0.1, 1.0, half_period=0)


def test_mmts_temperature_at_period_boundaries():
    sizes = torch.tensor([1, 11, 21])  # n_min = 1, n_max = 21: fractions 0, ½, 1
    EXTREMES = dict(n_min=1, n_max=21)
    shift = torch.tensor([0.05, 0.125, 0.20], dtype=torch.float64)
    for step, base in ((0, 0.04), (250, 0.0), (500, -0.04), (1000, 0.04), (2500, -0.04)):
        tau = mmts_temperature(step, 1000, sizes.double(), alpha=0.08, shift_min=0.05, shift_max=0.20, **EXTREMES)
        torch.testing.assert_close(tau, base + shift, rtol=0, atol=1e-15)
    out = mmts_temperature(0, 1000, sizes, **EXTREMES)
    assert out.dtype == torch.float32 and out.shape == (3,)


def test_equal_cluster_sizes_give_shift_min_without_division_by_zero():
    for sizes in (torch.full((5,), 7), torch.tensor([3])):
        sh = cluster_shift(sizes, 0.17, 0.30, n_min=sizes.min(), n_max=sizes.max())
        assert torch.isfinite(sh).all()
        torch.testing.assert_close(sh, torch.full_like(sh, 0.17), rtol=0, atol=0)
        tau = mmts_temperature(0, 100, sizes, alpha=0.2, shift_min=0.17, shift_max=0.30, n_min=sizes.min(),
                               n_max=sizes.max())
        torch.testing.assert_close(tau, torch.full(sizes.shape, 0.27), rtol=0, atol=1e-7)
    # explicit training-set extremes that coincide: still shift_min
    torch.testing.assert_close(cluster_shift(torch.tensor([4, 4]), 0.1, 0.2, n_min=4, n_max=4),
                               torch.full((2,), 0.1, dtype=torch.float64))


def test_cluster_shift_uses_given_training_set_extremes():
    """A batch's shifts must use the training set's n_min/n_max, not the batch's own extremes."""
    batch = torch.tensor([5, 10])
    torch.testing.assert_close(cluster_shift(batch, 0.0, 1.0, n_min=0, n_max=20),
                               torch.tensor([0.25, 0.5], dtype=torch.float64))
    torch.testing.assert_close(cluster_shift(batch, 0.0, 1.0, n_min=torch.tensor(0), n_max=torch.tensor(20.0)),
                               torch.tensor([0.25, 0.5], dtype=torch.float64))


def test_a_sample_gets_the_same_temperature_in_every_batch():
    """The quickstart trap: three samples of one cluster in a batch. τ_i must be sample i's value over the whole
    training set, whatever its batch — so the training set's extremes are required, and sizes outside them are
    refused."""
    dataset = torch.tensor([1, 5, 5, 5, 40, 200])
    whole = mmts_temperature(0, 100, dataset, n_min=dataset.min(), n_max=dataset.max())
    for index in (torch.tensor([1, 2, 3]), torch.tensor([3, 5]), torch.tensor([0, 2, 4])):
        torch.testing.assert_close(mmts_temperature(0, 100, dataset[index], n_min=1, n_max=200), whole[index],
                                   rtol=0, atol=0)
    assert not torch.allclose(whole[1:4], torch.full((3,), 0.09))  # 0.09: what the batch's own extremes gave
    with pytest.raises(TypeError, match="n_min"):
        mmts_temperature(step=0, period=100, cluster_sizes=torch.tensor([5, 5, 5]))
    with pytest.raises(TypeError, match="n_max"):
        cluster_shift(torch.tensor([5, 5, 5]), n_min=1)
    with pytest.raises(ValueError, match="whole training set"):
        mmts_temperature(0, 100, torch.tensor([5, 300]), n_min=1, n_max=200)


def test_head_clusters_get_higher_temperature():
    sizes = torch.tensor([1, 5, 50, 500])
    tau = mmts_temperature(123, 1000, sizes, n_min=1, n_max=500)
    assert (tau.diff() > 0).all()


def test_margin_is_the_same_per_sample_value():
    sizes = torch.tensor([2, 9, 40], dtype=torch.float64)
    for step in (0, 77, 5000):
        torch.testing.assert_close(mmts_margin(step, 300, sizes, 0.2, 0.17, 0.3, n_min=1, n_max=50),
                                   mmts_temperature(step, 300, sizes, 0.2, 0.17, 0.3, n_min=1, n_max=50),
                                   rtol=0, atol=0)


def test_tensor_step_equals_number_step():
    sizes = torch.tensor([1, 4, 9], dtype=torch.float64)
    for step in (0, 13, 999):
        torch.testing.assert_close(mmts_temperature(torch.tensor(step), 400, sizes, n_min=1, n_max=9),
                                   mmts_temperature(step, 400, sizes, n_min=1, n_max=9), rtol=0, atol=1e-15)
        assert float(cosine_temperature(torch.tensor(step), 0.1, 1.0, 400)) == pytest.approx(
            cosine_temperature(step, 0.1, 1.0, 400), abs=1e-15)


def test_linear_warmup():
    assert linear_warmup(0, 100, 0.5, 0.1) == pytest.approx(0.5)
    assert linear_warmup(50, 100, 0.5, 0.1) == pytest.approx(0.3)
    assert linear_warmup(100, 100, 0.5, 0.1) == pytest.approx(0.1)
    assert linear_warmup(1000, 100, 0.5, 0.1) == pytest.approx(0.1)
    assert linear_warmup(7, 0, 0.5, 0.1) == 0.1
    end = mmts_temperature(50, 1000, torch.tensor([1, 2, 3], dtype=torch.float64), n_min=1, n_max=3)
    ramp = linear_warmup(25, 100, 0.07, end)
    torch.testing.assert_close(ramp, 0.07 + 0.25 * (end - 0.07))
    assert ramp.dtype == torch.float64
    torch.testing.assert_close(linear_warmup(torch.tensor(25), 100, 0.07, end), ramp)


@given(
    step=st.floats(0, 1e6),
    period=st.floats(1.0, 1e5),
    sizes=st.lists(st.integers(1, 100_000), min_size=1, max_size=20),
    alpha=st.floats(0.0, 0.5),
    shift_min=st.floats(0.0, 0.5),
    shift_width=st.floats(0.0, 0.5),
    tau_min=st.floats(1e-3, 1.0),
    tau_width=st.floats(0.0, 2.0),
)
def test_schedules_equal_the_design_formulas(step, period, sizes, alpha, shift_min, shift_width, tau_min, tau_width):
    tau_max, shift_max = tau_min + tau_width, shift_min + shift_width
    ts = tau_min + 0.5 * (tau_max - tau_min) * (1 + math.cos(2 * math.pi * step / period))
    assert abs(cosine_temperature(step, tau_min, tau_max, period) - ts) <= 1e-9

    n_min, n_max = min(sizes), max(sizes)
    expected = []
    for n in sizes:
        sh = shift_min if n_max == n_min else shift_min + (n - n_min) / (n_max - n_min) * (shift_max - shift_min)
        expected.append(alpha / 2 * math.cos(2 * math.pi * step / period) + sh)
    extremes = dict(n_min=n_min, n_max=n_max)
    got = mmts_temperature(step, period, torch.tensor(sizes, dtype=torch.float64), alpha, shift_min, shift_max,
                           **extremes)
    assert got.dtype == torch.float64
    assert max(abs(a - b) for a, b in zip(got.tolist(), expected)) <= 1e-9
    got_margin = mmts_margin(step, period, torch.tensor(sizes, dtype=torch.float64), alpha, shift_min, shift_max,
                             **extremes)
    assert torch.equal(got_margin, got)


E12 = dict(n_min=1, n_max=2)


@pytest.mark.parametrize("call,exc,word", [
    (lambda: cosine_temperature(0, 0.1, 1.0, 0), ValueError, "period"),
    (lambda: cosine_temperature(0, 0.5, 0.1, 10), ValueError, "tau_min"),
    (lambda: cosine_temperature(0, 0.0, 0.1, 10), ValueError, "tau_min"),
    (lambda: cosine_temperature("0", 0.1, 1.0, 10), TypeError, "step"),
    (lambda: mmts_temperature(0, -1, torch.tensor([1, 2]), **E12), ValueError, "period"),
    (lambda: mmts_temperature(0, float("nan"), torch.tensor([1, 2]), **E12), ValueError, "period"),
    (lambda: mmts_temperature(0, 10, torch.ones(2, 2), **E12), ValueError, "cluster_sizes"),
    (lambda: mmts_temperature(0, 10, torch.tensor([True, False]), **E12), TypeError, "cluster_sizes"),
    (lambda: mmts_temperature(0, 10, torch.tensor([1, 2]), **E12, alpha=-0.1), ValueError, "alpha"),
    (lambda: mmts_temperature(0, 10, torch.tensor([1, 2]), shift_min=0.3, shift_max=0.1, **E12), ValueError,
     "shift_min"),
    (lambda: mmts_temperature(torch.zeros(2), 10, torch.tensor([1, 2]), **E12), ValueError, "step"),
    (lambda: cluster_shift(torch.tensor([1, 2]), n_min=5, n_max=1), ValueError, "n_min"),
    (lambda: cluster_shift(torch.tensor([1, 2]), n_min=torch.ones(2), n_max=2), TypeError, "n_min"),
    (lambda: cluster_shift(torch.tensor([1, 2]), n_min=1, n_max=float("inf")), ValueError, "n_max"),
    (lambda: cluster_shift(torch.tensor([1, 2]), n_min="1", n_max=2), TypeError, "n_min"),
    (lambda: linear_warmup(0, -1, 0.1, 0.2), ValueError, "warmup_steps"),
])
def test_bad_arguments_raise_naming_them(call, exc, word):
    with pytest.raises(exc, match=word):
        call()
