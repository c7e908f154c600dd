"""Perplexity on held-out token shards, at the training length and as a function of context length.

The held-out split is read as one token stream (each shard: a leading EOS, then documents each ending in
EOS, as `data/shards.py` writes them) and cut into non-overlapping windows of L + 1 tokens: the model
reads the first L and is scored on the next-token prediction of each of them (the nanoGPT / Megatron
validation convention). Windows cross document boundaries, as training windows of concat-and-chunk do.

Perplexity by context length repeats this for several L. Beyond the training length a model whose state
"collapses" (Mamba, mLSTM without length generalisation) gets worse with more context instead of better;
`ppl_tail` (perplexity of the positions in the second half of each window, which all see at least L / 2
tokens of context) and the per-position curve show it most directly. Long windows go through the model in
chunks that carry the recurrent state / KV cache, so memory is bounded by the chunk, not by L.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data import open_split


def heldout_stream(shards_dir: str | Path, split: str = "val") -> np.ndarray:
    """All tokens of a split, shards concatenated in order (int64)."""
    shards = open_split(shards_dir, split)
    return np.concatenate([np.asarray(t, dtype=np.int64) for t in shards.tokens])


def windows(stream: np.ndarray, length: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows (N, length + 1) from the start of the stream, N * length <= max_tokens (N >= 1)."""
    n = (len(stream) - 1) // length
    if n == 0:
        raise ValueError(f"the held-out stream has {len(stream)} tokens, too few for one window of {length} + 1")
    if max_tokens is not None:
        n = max(1, min(n, max_tokens // length))
    idx = np.arange(n)[:, None] * length + np.arange(length + 1)[None, :]
    return torch.from_numpy(stream[idx])


@torch.no_grad()
def token_nll(model, windows: torch.Tensor, batch_size: int = 8, chunk_size: int | None = None) -> torch.Tensor:
    """Next-token NLL (N, L) in fp32 of every position of windows (N, L + 1)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size].to(device)
        ids, targets = w[:, :-1], w[:, 1:]
        chunk = chunk_size or ids.shape[1]
        state, pieces = None, []
        for start in range(0, ids.shape[1], chunk):
            res = model(ids[:, start:start + chunk], state=state, return_state=True)
            state = res.state
            logits = res.logits.float()
            pieces.append(F.cross_entropy(logits.transpose(1, 2), targets[:, start:start + chunk], reduction="none"))
        out.append(torch.cat(pieces, dim=1).cpu())
    return torch.cat(out)


def _summary(nll: torch.Tensor, length: int) -> dict:
    tail = nll[:, length // 2:]
    return {
        "length": length,
        "windows": nll.shape[0],
        "tokens": nll.numel(),
        "nll": nll.mean().item(),
        "ppl": float(np.exp(nll.mean().item())),
        "ppl_tail": float(np.exp(tail.mean().item())),
    }


def perplexity(model, stream: np.ndarray, length: int, *, max_tokens: int | None = None, batch_size: int = 8,
               chunk_size: int | None = None) -> dict:
    """Perplexity of windows of `length` tokens: {length, windows, tokens, nll, ppl, ppl_tail}."""
    nll = token_nll(model, windows(stream, length, max_tokens), batch_size, chunk_size)
    return _summary(nll, length)


def position_buckets(nll: torch.Tensor) -> list[dict]:
    """Mean NLL by position in buckets [0, 1), [1, 2), [2, 4), ... [2^k, L): how loss falls with context."""
    length, out, lo = nll.shape[1], [], 0
    hi = 1
    while lo < length:
        seg = nll[:, lo:min(hi, length)]
        out.append({"start": lo, "end": min(hi, length), "nll": seg.mean().item()})
        lo, hi = hi, hi * 2
    return out


def perplexity_by_length(model, stream: np.ndarray, lengths: list[int], *, max_tokens: int | None = None,
                         batch_size: int = 8, chunk_size: int | None = None) -> dict:
    """Perplexity at each context length that fits the stream; the longest also gets a per-position curve.

    Every length scores about `max_tokens` tokens (fewer windows for longer lengths), so the cost per
    length is flat. Lengths longer than the held-out stream are listed under `skipped`.
    """
    fits = sorted(L for L in lengths if L < len(stream))
    by_length, curve = [], []
    for L in fits:
        nll = token_nll(model, windows(stream, L, max_tokens), batch_size, chunk_size)
        by_length.append(_summary(nll, L))
        if L == fits[-1]:
            curve = position_buckets(nll)
    return {"lengths": by_length, "by_position": curve, "skipped": sorted(set(lengths) - set(fits))}
