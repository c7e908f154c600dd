"""TrainBatches: token budget per step, one use per chunk per epoch, determinism and resume across dp sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data import DataError, TrainBatches, prepare


def rows(micro_batches, key="input_ids"):
    return torch.cat([m[key] for m in micro_batches])


@pytest.mark.parametrize("dp_size,micro_batch_size", [(1, 2), (2, 2), (4, 1)])
def test_every_step_holds_tokens_per_step(prepared, dp_size, micro_batch_size):
    prepared = prepared.model_copy(update={"micro_batch_size": micro_batch_size})
    ranks = [TrainBatches(prepared, dp_rank=r, dp_size=dp_size, seed=0) for r in range(dp_size)]
    ga = prepared.grad_accum_steps(dp_size)
    lengths = set()
    for _ in range(ranks[0].steps_per_epoch + 3):  # into the second epoch
        total = 0
        step_t = set()
        for tb in ranks:
            mbs = tb.next_step()
            assert len(mbs) == ga
            for m in mbs:
                b, t = m["input_ids"].shape
                assert b * t == prepared.micro_batch_size * prepared.seq_len  # constant tokens per micro batch
                assert m["labels"].shape == (b, t) and m["input_ids"].dtype == torch.long
                assert torch.equal(m["input_ids"][:, 1:], m["labels"][:, :-1])  # labels are the next tokens
                step_t.add(t)
                total += b * t
        assert len(step_t) == 1  # one sequence length per step
        lengths |= step_t
        assert total == prepared.tokens_per_step
    assert len(lengths) > 1  # the corpus fills several buckets


def test_every_chunk_used_exactly_once_per_epoch(prepared):
    tb = TrainBatches(prepared, dp_rank=0, dp_size=1, seed=3)
    for epoch in range(2):
        used = {b.length: [] for b in tb.buckets}
        for s in range(epoch * tb.steps_per_epoch, (epoch + 1) * tb.steps_per_epoch):
            bucket, chunks = tb.global_batch(s)
            used[bucket.length].extend(chunks.tolist())
        for b, per_step in zip(tb.buckets, tb.seqs_per_step):
            ids = used[b.length]
            assert len(ids) == len(set(ids)), "a chunk was used twice in one epoch"
            leftover = len(b) - len(ids)
            assert 0 <= leftover < per_step, "only less than one step's worth may stay unused"
        if epoch == 0:
            first = used
    assert first != used, "the next epoch reshuffles"


def test_sequences_hold_one_document_each(prepared):
    tb = TrainBatches(prepared, dp_rank=0, dp_size=1, seed=0)
    eos = tb.eos_id
    for _ in range(tb.steps_per_epoch):
        bucket, chunks = tb.global_batch(tb.step)
        x = rows(tb.next_step(), "labels")
        # EOS ends a document, so in a decomposition chunk it can only be the last label
        assert not (x[:, :-1] == eos).any()
        for row, c in zip(x, chunks):
            s = int(bucket.start[c])
            assert torch.equal(row, torch.from_numpy(tb.shards.tokens[bucket.shard[c]][s : s + bucket.length]
                                                     .astype(np.int64)))


def test_global_batch_does_not_depend_on_dp(prepared):
    one = TrainBatches(prepared, dp_rank=0, dp_size=1, seed=5)
    two = TrainBatches(prepared, dp_rank=1, dp_size=2, seed=5)
    for s in (0, 1, 7, one.steps_per_epoch + 2):
        (b1, c1), (b2, c2) = one.global_batch(s), two.global_batch(s)
        assert b1.length == b2.length and np.array_equal(c1, c2)
    other_seed = TrainBatches(prepared, dp_rank=0, dp_size=1, seed=6)
    assert any(not np.array_equal(one.global_batch(s)[1], other_seed.global_batch(s)[1]) for s in range(5))


def test_resume_gives_the_uninterrupted_sequence(prepared):
    ref = TrainBatches(prepared, dp_rank=0, dp_size=1, seed=1)
    expected = [rows(ref.next_step()) for _ in range(12)]

    first = TrainBatches(prepared, dp_rank=0, dp_size=1, seed=1)
    for _ in range(5):
        first.next_step()
    state = json.loads(json.dumps(first.state_dict()))  # small and JSON-able
    resumed = TrainBatches(prepared, dp_rank=0, dp_size=1, seed=1)
    resumed.load_state_dict(state)
    for s in range(5, 12):
        assert torch.equal(rows(resumed.next_step()), expected[s])


def test_resume_with_another_dp_size(prepared):
    ref = TrainBatches(prepared, dp_rank=0, dp_size=1, seed=2)
    for _ in range(4):
        ref.next_step()
    state = ref.state_dict()
    ranks = [TrainBatches(prepared, dp_rank=r, dp_size=2, seed=2) for r in range(2)]
    for tb in ranks:
        tb.load_state_dict(state)
    for _ in range(6):
        whole = rows(ref.next_step())
        halves = torch.cat([rows(tb.next_step()) for tb in ranks])  # rank 0's slice, then rank 1's
        assert torch.equal(halves, whole)


def test_state_from_other_settings_is_refused(prepared):
    state = TrainBatches(prepared, dp_rank=0, dp_size=1, seed=1).state_dict()
    with pytest.raises(DataError, match="seed"):
        TrainBatches(prepared, dp_rank=0, dp_size=1, seed=2).load_state_dict(state)
    other = prepared.model_copy(update={"curriculum": "natural"})
    with pytest.raises(DataError, match="curriculum"):
        TrainBatches(other, dp_rank=0, dp_size=1, seed=1).load_state_dict(state)


def test_natural_epoch_follows_bucket_tokens(prepared):
    cfg = prepared.model_copy(update={"curriculum": "natural"})
    tb = TrainBatches(cfg, dp_rank=0, dp_size=1, seed=0)
    seen = [tb.global_batch(s)[0].length for s in range(tb.steps_per_epoch)]
    for b, n in zip(tb.buckets, tb.steps_per_bucket):
        assert seen.count(b.length) == n  # steps of a bucket = its tokens // tokens_per_step


def test_decompose_rows_carry_no_boundaries(prepared):
    cfg = prepared.model_copy(update={"separate_documents": True})  # its rows are one document each
    assert "cu_seqlens" not in TrainBatches(cfg, dp_rank=0, dp_size=1, seed=0).next_step()[0]


def test_concat_mode_fixed_length_and_document_boundaries(tmp_path, words_jsonl, make_cfg):
    cfg = make_cfg(tmp_path, [words_jsonl], mode="concat", seq_len=48, micro_batch_size=2, tokens_per_step=192,
                   separate_documents=True)
    prepare(cfg, progress=False)
    tb = TrainBatches(cfg, dp_rank=0, dp_size=1, seed=0)
    boundaries = 0
    for _ in range(tb.steps_per_epoch):
        for m in tb.next_step():
            x, cu = m["input_ids"], m["cu_seqlens"]
            assert x.shape == (2, 48) and cu.ndim == 1 and cu.dtype == torch.long
            assert cu[0] == 0 and cu[-1] == 96 and 48 in cu.tolist() and (cu[1:] > cu[:-1]).all()
            # a new document starts right after an input EOS (the EOS is its BOS), and only there
            inner = set(cu.tolist()) - {0, 48, 96}
            eos = {t for t in (x.flatten() == tb.eos_id).nonzero()[:, 0].tolist() if t % 48}
            assert inner == eos
            boundaries += len(inner)
    assert boundaries > 0
    assert tb.steps_per_epoch == (len(tb.buckets[0])) // (192 // 48)
