"""Dataset decomposition (Pouransari et al. 2024) and the concat-and-chunk baseline, as chunk lists.

A *chunk* is a training sequence of length L, given by the position `start` of
its first label token in a shard: the model reads tokens[start - 1 : start + L]
and uses input_ids = [:-1], labels = [1:]. So a sequence of length L has exactly
L inputs and L labels, and no padding is ever needed.

Decomposition. A document of L tokens (its EOS included) is first cut into
`floor(L / max_len)` pieces of `max_len`; the remainder r is split by the binary
expansion of r, largest piece first: r = 13 -> pieces 8, 4, 1. Pieces shorter
than `min_len` (the low bits of r) are dropped and counted. Every piece keeps
all of its L label tokens inside one document; its one extra input token (at
start - 1) is the previous token of the same document, or, for the first piece
of a document, the EOS before it, which acts as that document's BOS. Bucket
`2^i` holds every piece of length 2^i.

Concat. The shard's token stream is cut into windows of `seq_len` labels
starting at position 1 (position 0 is the shard's leading EOS); windows cross
document boundaries and the last partial window of each shard is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def decompose_documents(
    doc_starts: np.ndarray, doc_lengths: np.ndarray, max_len: int, min_len: int
) -> tuple[dict[int, np.ndarray], int]:
    """Split documents into power-of-two pieces.

    Returns ({length: start positions of the pieces of that length, in document order}, dropped tokens).
    `doc_starts` are the positions of each document's first token, `doc_lengths` their lengths.
    """
    starts = np.asarray(doc_starts, dtype=np.int64)
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    n_full = lengths // max_len
    rem = lengths % max_len

    # Pieces of max_len: document d contributes n_full[d] of them at start + k * max_len.
    first = np.cumsum(n_full) - n_full
    k = np.arange(int(n_full.sum()), dtype=np.int64) - np.repeat(first, n_full)
    chunks = {max_len: np.repeat(starts, n_full) + k * max_len}

    # The remainder by bits, largest first: the piece of bit b starts after the pieces of the higher bits.
    base = starts + n_full * max_len
    dropped = 0
    for bit in range(max_len.bit_length() - 2, -1, -1):
        length = 1 << bit
        has = ((rem >> bit) & 1).astype(bool)
        if length >= min_len:
            chunks[length] = (base + ((rem >> (bit + 1)) << (bit + 1)))[has]
        else:
            dropped += length * int(has.sum())
    return chunks, dropped


def concat_windows(num_tokens: int, seq_len: int) -> np.ndarray:
    """Start positions of the full seq_len windows of one shard (labels from position 1 on)."""
    return 1 + np.arange((num_tokens - 1) // seq_len, dtype=np.int64) * seq_len


@dataclass
class Bucket:
    """All chunks of one length over every shard of a split."""

    length: int
    shard: np.ndarray  # (n,) int32: shard index of each chunk
    start: np.ndarray  # (n,) int64: position of the chunk's first label token in its shard

    def __len__(self) -> int:
        return len(self.start)


def build_buckets(
    offsets: list[np.ndarray], mode: str, seq_len: int, min_len: int
) -> tuple[list[Bucket], int]:
    """Chunks of every shard (given by its document offsets), shortest bucket first, and dropped tokens."""
    per_length: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    dropped = 0
    for i, off in enumerate(offsets):
        if mode == "concat":
            parts = {seq_len: concat_windows(int(off[-1]), seq_len)}
            dropped += int(off[-1]) - 1 - len(parts[seq_len]) * seq_len
        else:
            parts, d = decompose_documents(off[:-1], np.diff(off), seq_len, min_len)
            dropped += d
        for length, s in parts.items():
            per_length.setdefault(length, []).append((np.full(len(s), i, dtype=np.int32), s))
    if mode == "concat":
        lengths = [seq_len]
    else:
        lengths = [1 << b for b in range(min_len.bit_length() - 1, seq_len.bit_length())]
    buckets = []
    for length in lengths:
        parts = per_length.get(length, [])
        shard = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int32)
        start = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
        buckets.append(Bucket(length, shard, start))
    return buckets, dropped


def bucket_report(buckets: list[Bucket], dropped: int, tokens_per_step: int) -> dict:
    """Tokens and sequences per bucket, dropped tokens and full steps per epoch (for decomposition.json)."""
    rows = []
    for b in buckets:
        per_step = tokens_per_step // b.length
        rows.append(
            {
                "length": b.length,
                "sequences": len(b),
                "tokens": len(b) * b.length,
                "sequences_per_step": per_step,
                "steps_per_epoch": len(b) // per_step if per_step else 0,
            }
        )
    kept = sum(r["tokens"] for r in rows)
    return {
        "buckets": rows,
        "kept_tokens": kept,
        "dropped_tokens": dropped,
        "steps_per_epoch": sum(r["steps_per_epoch"] for r in rows),
    }
