"""Curricula: the order in which an epoch's steps visit the decomposition buckets.

An epoch is a fixed multiset of steps: bucket b (sequence length L_b) holds
n_b chunks and one step takes S_b = tokens_per_step / L_b of them, so the bucket
gives B_b = floor(n_b / S_b) steps. The fewer than S_b chunks left over in a
bucket are unused this epoch (the next epoch reshuffles, so other chunks are
left over then). A curriculum only orders these steps, so every chunk that fits
is used exactly once per epoch whatever the curriculum, and the epoch ends
when every bucket is spent. Buckets are indexed shortest first.

- `natural`: a uniformly random order of all steps. At any point the chance of
  bucket b is its share of the remaining steps, i.e. of the remaining tokens
  (Pouransari et al.'s "Natural" odds).
- `uniform`: each step picks uniformly among the buckets that still hold a full
  step. The mix is uniform until the smallest bucket runs out; from then on the
  draw is among the buckets left (the tail of the epoch is long buckets only
  when short buckets are small, or the reverse).
- `grow_p2`: OLMo-core's `VSLGrowP2Curriculum` (its reading of the paper's Grow-P2
  with cycles). Only buckets with at least one step take part; say there are n.
  The epoch is cut into `cycles` cycles and every bucket spreads its steps
  evenly over them (B_b split as evenly as integers allow, earlier cycles get
  the extra one). Each cycle is cut into n sub-cycles; bucket b (0 = shortest)
  spreads its steps of the cycle over the sub-cycles k = 0..n-1 in proportion
  to the odds 2^(n-1-b+k) for k <= b and 2^(n-1-k) for k > b (e.g. n = 3:
  shortest [4, 2, 1], middle [2, 4, 1], longest [1, 2, 4]), rounded by largest
  remainder so the counts add up exactly. The steps of a sub-cycle are
  shuffled. So within each cycle the mix moves from short to long sequences,
  and over the cycle each bucket keeps its natural share.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CURRICULA = ("natural", "grow_p2", "uniform")


def apportion(total: int, weights: Sequence[float]) -> np.ndarray:
    """Split `total` into integers proportional to `weights` (largest remainder; ties to the lower index)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:short]] += 1
    return counts


def grow_p2_odds(n: int) -> np.ndarray:
    """(n, n) odds: row b = bucket (shortest first), column k = sub-cycle; peaks at k == b."""
    b = np.arange(n)[:, None]
    k = np.arange(n)[None, :]
    exponent = np.where(k <= b, n - 1 - b + k, n - 1 - k)
    return (2.0**exponent).astype(np.float64)


def epoch_plan(
    curriculum: str, steps_per_bucket: Sequence[int], *, cycles: int, rng: np.random.Generator
) -> np.ndarray:
    """Bucket index of every step of one epoch; bucket b appears exactly steps_per_bucket[b] times."""
    counts = np.asarray(steps_per_bucket, dtype=np.int64)
    if curriculum == "natural":
        return rng.permutation(np.repeat(np.arange(len(counts)), counts))
    if curriculum == "uniform":
        remaining = counts.copy()
        plan = np.empty(int(counts.sum()), dtype=np.int64)
        for t in range(len(plan)):
            available = np.flatnonzero(remaining)
            b = available[rng.integers(len(available))]
            plan[t] = b
            remaining[b] -= 1
        return plan
    if curriculum == "grow_p2":
        return _grow_p2_plan(counts, cycles, rng)
    raise ValueError(f"unknown curriculum {curriculum!r}; choose one of {CURRICULA}")


def _grow_p2_plan(counts: np.ndarray, cycles: int, rng: np.random.Generator) -> np.ndarray:
    active = np.flatnonzero(counts)
    n = len(active)
    odds = grow_p2_odds(n)
    steps = []
    for c in range(cycles):
        # (n, n): steps of active bucket i in sub-cycle k of this cycle
        per_sub = np.zeros((n, n), dtype=np.int64)
        for i, b in enumerate(active):
            in_cycle = counts[b] // cycles + (1 if c < counts[b] % cycles else 0)
            per_sub[i] = apportion(in_cycle, odds[i])
        for k in range(n):
            sub = np.repeat(active, per_sub[:, k])
            steps.append(rng.permutation(sub))
    return np.concatenate(steps) if steps else np.zeros(0, dtype=np.int64)
