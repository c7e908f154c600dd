"""The MQAR generator has the properties Zoology defines, and its accuracy counts what it should.

Query placement is checked against the exact law of successive sampling without replacement from
Zoology's power law, computed here independently of numpy: the first pair's query slot follows p, the
second pair's follows sum_h p_h p_g / (1 - p_h).
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from eval.mqar import MQARSetting, generate_mqar, mqar_accuracy

SETTING = MQARSetting(vocab_size=256, seq_len=128, num_kv_pairs=8)


def chi_square_ok(counts: np.ndarray, probs: np.ndarray) -> bool:
    """Pearson's chi-square below its mean + 5 standard deviations (dof + 5 sqrt(2 dof)): a loose, seed-proof
    bound that still rejects a wrong law at these sample sizes (checked below with a uniform law)."""
    expected = probs * counts.sum()
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = len(counts) - 1
    return stat < dof + 5 * np.sqrt(2 * dof)


def test_keys_and_values_are_distinct_and_from_their_halves():
    b = generate_mqar(SETTING, 500, np.random.default_rng(0))
    half = SETTING.vocab_size // 2
    assert all(len(set(row)) == SETTING.num_kv_pairs for row in b.keys)
    assert all(len(set(row)) == SETTING.num_kv_pairs for row in b.values)
    assert b.keys.min() >= 1 and b.keys.max() < half
    assert b.values.min() >= half and b.values.max() < SETTING.vocab_size
    ctx = b.inputs[:, : SETTING.context_len].numpy()
    assert (ctx[:, 0::2] == b.keys).all() and (ctx[:, 1::2] == b.values).all()
    assert b.inputs.shape == b.labels.shape == (500, SETTING.seq_len)


def test_every_query_is_answered_by_the_value_stored_earlier():
    b = generate_mqar(SETTING, 300, np.random.default_rng(1))
    inputs, labels = b.inputs.numpy(), b.labels.numpy()
    for x, y in zip(inputs, labels):
        stored = dict(zip(x[0:SETTING.context_len:2], x[1:SETTING.context_len:2]))
        positions = np.flatnonzero(y != -100)
        assert len(positions) == SETTING.num_kv_pairs  # each key queried exactly once
        assert sorted(x[positions]) == sorted(stored)
        for t in positions:
            assert t >= SETTING.context_len and (t - SETTING.context_len) % 2 == 0
            assert y[t] == stored[x[t]]


def test_fillers_are_random_tokens_or_zero():
    for random_fill in (True, False):
        s = MQARSetting(256, 128, 8, random_non_queries=random_fill)
        b = generate_mqar(s, 200, np.random.default_rng(2))
        filler = b.labels[:, s.context_len:] == -100
        values = b.inputs[:, s.context_len:][filler]
        if random_fill:
            assert values.unique().numel() > 200  # drawn from the whole vocabulary
        else:
            assert (values == 0).all()


def test_query_slots_follow_the_power_law():
    s = MQARSetting(vocab_size=128, seq_len=64, num_kv_pairs=4, power_a=0.01)
    n = 20000
    b = generate_mqar(s, n, np.random.default_rng(3))
    p = s.slot_probabilities()
    g = np.arange(1, s.num_slots + 1)
    assert np.allclose(p, g ** -0.99 / (g ** -0.99).sum())
    second = np.array([sum(p[h] * p[j] / (1 - p[h]) for h in range(len(p)) if h != j) for j in range(len(p))])
    first_counts = np.bincount(b.slots[:, 0], minlength=s.num_slots)
    second_counts = np.bincount(b.slots[:, 1], minlength=s.num_slots)
    assert chi_square_ok(first_counts, p)
    assert chi_square_ok(second_counts, second / second.sum())
    # The check has power: the same counts are rejected against a uniform law and against swapped laws.
    assert not chi_square_ok(first_counts, np.full(s.num_slots, 1 / s.num_slots))
    assert not chi_square_ok(second_counts, p)
    # Slots are distinct within an example and the query sits at context + 2 * slot.
    assert all(len(set(row)) == s.num_kv_pairs for row in b.slots)
    pos = s.context_len + 2 * b.slots
    assert (np.take_along_axis(b.inputs.numpy(), pos, 1) == b.keys).all()


def test_read_twice_gives_the_context_again_before_the_same_queries():
    """JRT: the same draws as the plain example, with the k-v context repeated right after itself."""
    twice = MQARSetting(256, 128, 8, read_twice=True)
    plain = generate_mqar(SETTING, 100, np.random.default_rng(5))
    b = generate_mqar(twice, 100, np.random.default_rng(5))
    ctx = SETTING.context_len
    assert twice.input_len == b.inputs.shape[1] == SETTING.seq_len + ctx
    assert torch.equal(b.inputs[:, :ctx], b.inputs[:, ctx:2 * ctx])
    assert torch.equal(b.inputs[:, ctx:], plain.inputs) and torch.equal(b.labels[:, ctx:], plain.labels)
    assert (b.labels[:, : 2 * ctx] == -100).all()


def test_zoology_preconditions_are_enforced():
    with pytest.raises(ValueError, match="4 \\* num_kv_pairs"):
        MQARSetting(256, 64, 17)
    with pytest.raises(ValueError, match="vocab_size > seq_len"):
        MQARSetting(64, 64, 4)
    with pytest.raises(ValueError, match="even"):
        MQARSetting(256, 63, 4)


def test_accuracy_counts_only_query_positions():
    b = generate_mqar(MQARSetting(64, 32, 4), 50, np.random.default_rng(4))

    class Oracle(torch.nn.Module):
        """Predicts the label at query positions and token 0 elsewhere; `wrong` breaks every other row."""

        def __init__(self, wrong: bool):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.wrong = wrong

        def forward(self, ids):
            lookup = {tuple(x.tolist()): y for x, y in zip(b.inputs, b.labels)}
            target = torch.stack([lookup[tuple(x.tolist())] for x in ids]).clamp(min=0)
            if self.wrong:
                target[::2] = (target[::2] + 1) % 64
            return SimpleNamespace(logits=torch.nn.functional.one_hot(target, 64).float())

    assert mqar_accuracy(Oracle(False), b, batch_size=16) == 1.0
    assert mqar_accuracy(Oracle(True), b, batch_size=16) == pytest.approx(0.5)
