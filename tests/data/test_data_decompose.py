"""Dataset decomposition and concat windows: property tests on random document lengths."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from data.decompose import build_buckets, concat_windows, decompose_documents

lengths_st = st.lists(st.integers(min_value=1, max_value=700), min_size=1, max_size=40)
exp_st = st.tuples(st.integers(0, 9), st.integers(0, 9)).map(sorted)  # (log2 min_len, log2 max_len)


@settings(max_examples=200, deadline=None)
@given(lengths=lengths_st, exps=exp_st, gap=st.integers(0, 3))
def test_decomposition_properties(lengths, exps, gap):
    min_len, max_len = 1 << exps[0], 1 << exps[1]
    lengths = np.array(lengths)
    # documents laid out like a shard: a leading token, documents back to back (gap > 0 only spaces them out)
    starts = 1 + np.concatenate([[0], np.cumsum(lengths + gap)[:-1]])
    chunks, dropped = decompose_documents(starts, lengths, max_len, min_len)

    kept = sum(L * len(s) for L, s in chunks.items())
    assert kept + dropped == lengths.sum()
    for L in chunks:
        assert L & (L - 1) == 0 and min_len <= L <= max_len

    # Each chunk lies inside exactly one document; per document, the chunks tile a prefix, largest first.
    owner_of = {}
    for L, s in chunks.items():
        for start in s:
            d = int(np.searchsorted(starts, start, side="right") - 1)
            assert starts[d] <= start and start + L <= starts[d] + lengths[d], "chunk crosses a document end"
            owner_of.setdefault(d, []).append((int(start), L))
    for d in range(len(lengths)):
        pieces = sorted(owner_of.get(d, []))
        pos = starts[d]
        for start, L in pieces:
            assert start == pos, "chunks of a document are contiguous from its first token"
            pos += L
        sizes = [L for _, L in pieces]
        assert sizes == sorted(sizes, reverse=True), "largest piece first"
        assert starts[d] + lengths[d] - pos < min_len, "only a remainder shorter than min_len is dropped"
        # the binary expansion of the remainder, above min_len
        rem = lengths[d] % max_len
        expected = [max_len] * (lengths[d] // max_len) + [1 << b for b in range(9, -1, -1)
                                                          if rem >> b & 1 and min_len <= 1 << b < max_len]
        assert sizes == expected


def test_example_from_the_paper_style():
    # a document of 13 tokens with max 8, min 2: 8 + 4, the last token dropped
    chunks, dropped = decompose_documents(np.array([1]), np.array([13]), 8, 2)
    assert {L: list(s) for L, s in chunks.items() if len(s)} == {8: [1], 4: [9]}
    assert dropped == 1
    # 21 tokens with max 8, min 1: 8 + 8 + 4 + 1
    chunks, dropped = decompose_documents(np.array([1]), np.array([21]), 8, 1)
    assert {L: list(s) for L, s in chunks.items() if len(s)} == {8: [1, 9], 4: [17], 1: [21]}
    assert dropped == 0


@settings(deadline=None)
@given(num_tokens=st.integers(1, 2000), seq_len=st.integers(1, 300))
def test_concat_windows_tile_the_stream(num_tokens, seq_len):
    s = concat_windows(num_tokens, seq_len)
    assert len(s) == (num_tokens - 1) // seq_len
    assert np.all(np.diff(s) == seq_len) and (len(s) == 0 or s[0] == 1)
    assert len(s) == 0 or s[-1] + seq_len <= num_tokens


def test_build_buckets_over_shards():
    offsets = [np.array([1, 14, 20, 100]), np.array([1, 40])]
    buckets, dropped = build_buckets(offsets, "decompose", 32, 4)
    assert [b.length for b in buckets] == [4, 8, 16, 32]
    total = sum(int(o[-1] - o[0]) for o in offsets)
    assert sum(len(b) * b.length for b in buckets) + dropped == total
    for b in buckets:
        assert set(b.shard.tolist()) <= {0, 1}
    buckets, dropped = build_buckets(offsets, "concat", 16, 4)
    assert [b.length for b in buckets] == [16]
    assert len(buckets[0]) == (100 - 1) // 16 + (40 - 1) // 16
    assert len(buckets[0]) * 16 + dropped == 99 + 39
