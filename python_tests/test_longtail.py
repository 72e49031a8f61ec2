"""Tests of the long-tail experiment (`python -m bench.longtail`): its statistics, controls, data and tuning, and a
tiny end-to-end run. Each runs in seconds."""
from __future__ import annotations

import os
import sys

import pytest
import torch

import mmts_kernels as mk

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `bench` is not an installed package: import it from the checkout

from bench import longtail, longtail_data, longtail_methods, longtail_stats  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# Statistics

def test_t_quantile_matches_the_tables():
    # Two-sided 95% / 99% critical values of Student's t (standard tables).
    for df, level, want in ((1, 0.95, 12.7062047362), (2, 0.95, 4.3026527297), (3, 0.95, 3.1824463053),
                            (9, 0.95, 2.2621571628), (30, 0.95, 2.0422724563), (9, 0.99, 3.2498355416)):
        assert longtail_stats.t_quantile(level, df) == pytest.approx(want, abs=1e-8)
    assert longtail_stats.t_two_sided_probability(0.0, 5) == 0.0
    with pytest.raises(ValueError, match="df"):
        longtail_stats.t_quantile(0.95, 0)


def test_paired_interval_against_a_hand_computed_case():
    # d = (1, 2, 3, 4): mean 2.5, sd = sqrt(5/3), se = sd / 2, t_{0.975, 3} = 3.18244630528.
    iv = longtail_stats.paired_interval([1.5, 2.5, 3.5, 4.5], [0.5, 0.5, 0.5, 0.5])
    half = 3.18244630528 * (5 / 3) ** 0.5 / 2
    assert iv.mean == pytest.approx(2.5) and iv.n == 4
    assert (iv.low, iv.high) == pytest.approx((2.5 - half, 2.5 + half))
    assert iv.excludes_zero()
    assert not longtail_stats.paired_interval([1.0, -1.0, 0.5], [0.0, 0.0, 0.0]).excludes_zero()
    with pytest.raises(ValueError, match="at least two"):
        longtail_stats.paired_interval([1.0], [0.0])
    with pytest.raises(ValueError, match="same length"):
        longtail_stats.paired_interval([1.0, 2.0], [0.0])


# ---------------------------------------------------------------------------------------------------------------
# Controls

def test_controls_keep_the_values_and_change_only_their_link_to_cluster_size():
    sizes = torch.tensor([8, 500, 8, 40, 500, 500, 40, 8, 500, 120])
    mmts = longtail_methods.Schedule("mmts", (0.04, 0.08, 0.30))
    period = 40.0
    shuffled = longtail_methods.assigned_sizes("shuffled", sizes, seed=3)
    reversed_ = longtail_methods.assigned_sizes("reversed", sizes, seed=3)
    assert torch.equal(shuffled.sort().values, sizes.sort().values)
    assert not torch.equal(shuffled, sizes)
    assert torch.equal(reversed_.sort().values, sizes.sort().values)
    # Reversed: the smallest cluster's samples get the largest size's value and vice versa.
    assert bool((reversed_[sizes == 8] == 500).all()) and bool((reversed_[sizes == 500] <= 40).all())
    for step in (0, 7, 20, 33):
        tau = longtail_methods.schedule_value(mmts, step, period, sizes)
        tau_rev = longtail_methods.schedule_value(mmts, step, period, reversed_)
        assert float(tau[sizes == 500].min()) > float(tau[sizes == 8].max())  # MM-TS: head → higher τ
        assert float(tau_rev[sizes == 8].min()) > float(tau_rev[sizes == 500].max())  # reversed: tail → higher
        assert torch.allclose(tau.sort().values, tau_rev.sort().values)
        # Mean shift: the same mean over samples at every step, no per-sample spread.
        centre = longtail_methods.schedule_value(longtail_methods.mean_shift(mmts, sizes), step, period, sizes)
        assert isinstance(centre, float) and centre == pytest.approx(float(tau.double().mean()), abs=1e-6)
    with pytest.raises(ValueError, match="assign"):
        longtail_methods.Schedule("cosine", (0.1, 0.2), assign="shuffled")


def test_recentred_ts_keeps_its_amplitude_and_takes_mm_ts_mean():
    sizes = torch.tensor([8, 8, 8, 500, 40, 500])
    mmts = longtail_methods.Schedule("mmts", (0.08, 0.05, 0.35))
    # sh = 0.05 + 0.30·(n − 8)/492: the mean over these six samples, by hand.
    want = sum(0.05 + 0.30 * (n - 8) / 492 for n in sizes.tolist()) / 6
    assert longtail_methods.mean_value(mmts, sizes) == pytest.approx(want)
    ts = longtail_methods.Schedule("cosine", (0.05, 0.30))
    moved = longtail_methods.recentred_at(ts, want)
    assert moved.params == pytest.approx((0.05 + want - 0.175, 0.30 + want - 0.175))
    assert longtail_methods.mean_value(moved, sizes) == pytest.approx(want)
    assert longtail_methods.recentred_at(ts, 0.05).params[0] == longtail_methods.TAU_FLOOR  # never τ ≤ 0
    # The rows built from the tuned settings: re-centred TS has TS's range moved to MM-TS's mean.
    chosen = {"TS": ts, "MM-TS": mmts}
    loss, sched = longtail.row_schedule("TS re-centred at MM-TS's mean τ", chosen, sizes)
    assert loss == "infonce" and sched == moved
    _, sched = longtail.row_schedule("MM-TS, reversed", chosen, sizes)
    assert sched == longtail_methods.Schedule("mmts", mmts.params, "reversed")


def test_dose_widths_stay_above_the_floor_around_the_tuned_centre():
    tuned = longtail_methods.Schedule("mmts", (0.08, 0.05, 0.35))
    scheds = longtail.dose_schedules(tuned, (0.25, 1.0))
    for s in scheds:
        alpha, lo, hi = s.params
        assert alpha == 0.08 and 0.5 * (lo + hi) == pytest.approx(0.2)
    assert scheds[0].params[2] - scheds[0].params[1] == pytest.approx(0.25 * (scheds[1].params[2]
                                                                              - scheds[1].params[1]))
    assert scheds[1].params[1] - 0.04 == pytest.approx(longtail.TAU_FLOOR)  # lowest τ of the widest range


# ---------------------------------------------------------------------------------------------------------------
# Data and evaluation

_SMALL = longtail_data.DataConfig(clusters=9, samples=900, min_cluster=6, feature_dim=8, latent_dim=4)


def test_data_has_head_duplicates_and_class_balanced_splits():
    cfg = _SMALL
    data = longtail_data.make_data(cfg, seed=0)
    sizes = data.cluster_sizes
    assert bool((sizes[:-1] >= sizes[1:]).all()) and int(sizes.min()) >= cfg.min_cluster
    assert torch.equal(torch.bincount(data.train.cluster, minlength=cfg.clusters), sizes)
    copies = [torch.bincount(data.train.instance[data.train.cluster == c]).float() for c in (0, cfg.clusters - 1)]
    assert float(copies[0][copies[0] > 0].mean()) > 3 * float(copies[1][copies[1] > 0].mean())  # head: duplicates
    per_query = cfg.eval_instances * cfg.eval_repeats
    for split in (data.val, data.test):
        assert torch.equal(torch.bincount(split.cluster), torch.full((cfg.clusters,), per_query))
        same = split.instance.view(-1, 1) == split.instance.view(1, -1)
        assert bool((same.sum(1) == cfg.eval_repeats).all())
    assert torch.equal(torch.bincount(data.tercile), torch.tensor([3, 3, 3]))
    assert int(data.tercile[0]) == 0 and int(data.tercile[-1]) == 2


def test_evaluation_is_perfect_for_ideal_embeddings_and_not_for_random_ones():
    data = longtail_data.make_data(_SMALL, seed=1)
    s = data.test
    n_inst = int(s.instance.max()) + 1
    # Same instance scores 1.25, same cluster 0.25, else 0: the ideal ranking of the graded relevance.
    ideal = torch.cat([torch.nn.functional.one_hot(s.instance, n_inst).float(),
                       0.5 * torch.nn.functional.one_hot(s.cluster, _SMALL.clusters).float()], dim=1)
    out = longtail_data.evaluate(ideal, ideal, s, data.tercile)
    for g in longtail_data.GROUPS:
        assert out[f"{g} nDCG"] == pytest.approx(1.0) and out[f"{g} mAP"] == pytest.approx(1.0)
        assert out[f"{g} R@10"] == 1.0
    g = torch.Generator().manual_seed(0)
    rand = torch.nn.functional.normalize(torch.randn(len(s.cluster), 8, generator=g), dim=1)
    out = longtail_data.evaluate(rand, rand.flip(0), s, data.tercile)
    assert out["overall nDCG"] < 0.6 and out["overall mAP"] < 0.6


# ---------------------------------------------------------------------------------------------------------------
# The label row

def test_label_row_uses_mm_ts_clusters_and_its_control_keeps_only_the_label_counts():
    data = longtail_data.make_data(_SMALL, seed=2)
    clusters = mk.clusters_from_labels(data.train.cluster)
    assert torch.equal(clusters.sizes, data.train_sizes)  # the assignment MM-TS's n_i come from
    mmts = longtail_methods.Schedule("mmts", (0.08, 0.05, 0.35))
    assert longtail_methods.batch_labels(mmts, data.train.cluster, seed=0) is None
    row = longtail_methods.Schedule("mmts", mmts.params, same_label="ignore")
    assert torch.equal(longtail_methods.batch_labels(row, data.train.cluster, seed=0), clusters.labels)
    control = longtail_methods.Schedule("mmts", mmts.params, same_label="ignore", labels="permuted")
    permuted = longtail_methods.batch_labels(control, data.train.cluster, seed=0)
    assert torch.equal(torch.bincount(permuted), clusters.counts)
    assert float((permuted == clusters.labels).double().mean()) < 0.5  # the content link is gone
    assert torch.equal(permuted, longtail_methods.batch_labels(control, data.train.cluster, seed=0))
    assert not torch.equal(permuted, longtail_methods.batch_labels(control, data.train.cluster, seed=1))
    # The control row takes the label row's tuned setting and changes only the labels.
    chosen = {longtail.LABEL_ROW: row}
    loss, sched = longtail.row_schedule(longtail.LABEL_CONTROL, chosen, data.train_sizes)
    assert loss == "infonce" and sched == control
    assert longtail.TUNED[longtail.LABEL_ROW][1] == [
        longtail_methods.Schedule("mmts", s.params, same_label="ignore") for s in longtail.TUNED["MM-TS"][1]]
    for bad in (dict(same_label="both"), dict(labels="permuted"), dict(same_label="ignore", labels="shuffled")):
        with pytest.raises(ValueError, match="same_label|labels"):
            longtail_methods.Schedule("mmts", mmts.params, **bad)
    assert control.describe() == "α=0.08, sh∈[0.05, 0.35], same cluster ignore, labels permuted"


def test_training_passes_each_batch_its_cluster_ids(monkeypatch):
    data = longtail_data.make_data(_SMALL, seed=3)
    cfg = longtail_methods.TrainConfig(hidden=8, embed_dim=4, steps=3, batch=16, backend="torch")
    seen = []
    real = mk.info_nce

    def spy(x, y, temperature, **kwargs):
        seen.append((kwargs.get("labels"), kwargs.get("same_label")))
        return real(x, y, temperature, **kwargs)

    monkeypatch.setattr(mk, "info_nce", spy)
    mmts = longtail_methods.Schedule("mmts", (0.08, 0.05, 0.35))
    for sched in (mmts, longtail_methods.Schedule("mmts", mmts.params, same_label="ignore"),
                  longtail_methods.Schedule("mmts", mmts.params, same_label="ignore", labels="permuted")):
        seen.clear()
        longtail_methods.train("infonce", sched, data, cfg, seed=5)
        labels = longtail_methods.batch_labels(sched, data.train.cluster, seed=5)
        g = torch.Generator().manual_seed(20_000 + 5)  # train's batch order for seed 5
        assert len(seen) == cfg.steps
        for got, same_label in seen:
            idx = torch.randperm(len(data.train.cluster), generator=g)[:cfg.batch]
            if labels is None:
                assert got is None and same_label is None
            else:
                assert same_label == "ignore" and torch.equal(got, labels[idx])


# ---------------------------------------------------------------------------------------------------------------
# Tuning and the end-to-end run

def test_tuning_gives_every_method_the_same_budget_on_validation_only(monkeypatch):
    calls = []

    def fake_score(self, loss, sched, cfg, seed, split):
        calls.append((loss, sched, seed, split))
        value = sum(sched.params) + (0.01 if seed == 1001 else 0.0)  # the largest parameters win
        return {longtail.PRIMARY: value}

    monkeypatch.setattr(longtail.Runner, "score", fake_score)

    class Bar:
        def set_postfix_str(self, _):
            pass

    exp = longtail.Experiment(tuning_seeds=2)
    chosen, scores = longtail.tune(longtail.Runner(exp, Bar()), exp)
    assert {split for *_, split in calls} == {"val"}
    assert {seed for _, _, seed, _ in calls} == {1000, 1001}  # never an evaluation seed (0 … seeds−1)
    for row, (loss, grid) in longtail.TUNED.items():
        assert len(grid) == longtail.GRID_SIZE
        assert sum(1 for c in calls if c[1] in grid and c[0] == loss) == longtail.GRID_SIZE * exp.tuning_seeds
        assert chosen[row] == max(grid, key=lambda s: sum(s.params))
        assert [v for _, v in scores[row]] == pytest.approx([sum(s.params) + 0.005 for s in grid])


def test_tiny_run_writes_a_new_file_and_never_overwrites(tmp_path):
    out = tmp_path / "lt.md"
    args = ["--seeds", "2", "--steps", "4", "--clusters", "6", "--samples", "200", "--tuning-seeds", "1",
            "--dose-seeds", "2", "--no-progress", "--out", str(out)]
    threads = torch.get_num_threads()
    try:
        longtail.main(args)
    finally:
        torch.set_num_threads(threads)
    text = out.read_text()
    assert "Primary metric (declared before any run): test overall nDCG" in text
    for key in ("command", "CPU", "wall time", "date", "load average"):
        assert f"**{key}" in text
    for row in longtail.ROWS:
        assert f"| {row} |" in text
    for a, b in longtail.COMPARISONS:
        assert f"{a} − {b}" in text
    assert "## Dose–response" in text and (tmp_path / "lt.json").exists()
    with pytest.raises(SystemExit):
        longtail.main(args)
    assert out.read_text() == text
    default = longtail.default_out(quick=True)
    assert default.startswith(os.path.join(REPO, "build", "")) and default.endswith("-quick.md")
