"""Curricula: every step of the epoch is used once, and the bucket mix follows each curriculum."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.curriculum import CURRICULA, apportion, epoch_plan, grow_p2_odds


def rng(seed=0):
    return np.random.default_rng(seed)


@settings(deadline=None)
@given(total=st.integers(0, 1000), weights=st.lists(st.floats(0.01, 100), min_size=1, max_size=8))
def test_apportion_is_exact_and_close(total, weights):
    counts = apportion(total, weights)
    assert counts.sum() == total and (counts >= 0).all()
    exact = total * np.array(weights) / sum(weights)
    assert np.all(np.abs(counts - exact) < 1 + 1e-9)


def test_grow_p2_odds_match_olmo_core():
    # OLMo-core VSLGrowP2Curriculum._get_bucket_odds_for_cycle for 3 and 4 buckets, written out by hand.
    assert grow_p2_odds(3).tolist() == [[4, 2, 1], [2, 4, 1], [1, 2, 4]]
    assert grow_p2_odds(4).tolist() == [[8, 4, 2, 1], [4, 8, 2, 1], [2, 4, 8, 1], [1, 2, 4, 8]]


@pytest.mark.parametrize("curriculum", CURRICULA)
@settings(deadline=None)
@given(counts=st.lists(st.integers(0, 60), min_size=1, max_size=6), cycles=st.integers(1, 9))
def test_every_step_used_exactly_once(curriculum, counts, cycles):
    plan = epoch_plan(curriculum, counts, cycles=cycles, rng=rng())
    assert np.bincount(plan, minlength=len(counts)).tolist() == counts


@pytest.mark.parametrize("curriculum", CURRICULA)
def test_plan_is_a_function_of_the_seed(curriculum):
    counts = [30, 20, 10, 5]
    a = epoch_plan(curriculum, counts, cycles=4, rng=rng(7))
    b = epoch_plan(curriculum, counts, cycles=4, rng=rng(7))
    c = epoch_plan(curriculum, counts, cycles=4, rng=rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_natural_mix_follows_token_share():
    # Equal tokens per step, so a bucket's token share is its share of steps.
    counts = np.array([800, 400, 200, 100])
    K = 500
    share = counts / counts.sum()
    seen = np.zeros(4)
    for seed in range(4):
        seen += np.bincount(epoch_plan("natural", counts, cycles=1, rng=rng(seed))[:K], minlength=4)
    n = 4 * K
    sigma = np.sqrt(n * share * (1 - share))  # binomial bound; sampling without replacement is tighter
    assert np.all(np.abs(seen - n * share) < 4 * sigma), (seen, n * share)


def test_uniform_mix_is_uniform_until_a_bucket_runs_out():
    counts = np.array([900, 600, 1200, 700])
    K = 800  # no bucket can run out in 800 draws of 1/4
    plan = epoch_plan("uniform", counts, cycles=1, rng=rng(3))
    seen = np.bincount(plan[:K], minlength=4)
    sigma = np.sqrt(K * 0.25 * 0.75)
    assert np.all(np.abs(seen - K / 4) < 4 * sigma), seen
    # at the end only the largest bucket is left
    assert np.all(plan[-100:] == 2)


def test_grow_p2_sub_cycles_follow_the_odds():
    counts = np.array([240, 120, 480])  # 3 buckets, shortest first
    cycles = 4
    plan = epoch_plan("grow_p2", counts, cycles=cycles, rng=rng(5))
    odds = np.array([[4, 2, 1], [2, 4, 1], [1, 2, 4]])
    pos = 0
    # (bucket, sub-cycle) steps: each bucket's quarter of its steps, split by its odds (OLMo-core's table)
    expected = np.stack([apportion(c // cycles, o) for c, o in zip(counts, odds)])
    for _ in range(cycles):
        means = []
        for k in range(3):
            n = int(expected[:, k].sum())
            sub = plan[pos : pos + n]
            pos += n
            assert np.bincount(sub, minlength=3).tolist() == expected[:, k].tolist()
            means.append(sub.mean())
        # within a cycle, the average sequence grows from short to long
        assert means[0] < means[1] < means[2]
    assert pos == len(plan)


def test_grow_p2_first_steps_are_short():
    counts = np.array([400, 200, 100, 50, 25])
    plan = epoch_plan("grow_p2", counts, cycles=8, rng=rng(0))
    first_sub_cycle = plan[: len(plan) // 8 // 5]
    assert np.bincount(first_sub_cycle, minlength=5).argmax() == 0


def test_grow_p2_skips_empty_buckets():
    plan = epoch_plan("grow_p2", [0, 10, 0, 10], cycles=2, rng=rng(0))
    assert set(plan.tolist()) == {1, 3} and len(plan) == 20
