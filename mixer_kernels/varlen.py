"""Packed documents for the chunked recurrences (GLA, gated delta rule, mLSTM): every document in one call.

flash-linear-attention's chunk kernels take `cu_seqlens` by giving each sequence its own chunks. Ours get
the same from a layout, without a branch in any kernel: `ChunkAligned` lays a packed batch's documents
out in one row, each starting on a chunk boundary and followed by 1 to L padding tokens (L the chunk),
and gives the last padding token of each document the log decay RESET. Padding has q = k = v = 0 and
beta = 0 (it writes nothing), and exp(RESET) is exactly 0 in fp32, so that token clears the state: the
next document starts from zero, as if alone (the mLSTM's stabiliser too: after the reset slot
m = max(RESET + m, i = 0) = 0, a fresh sequence's start). RESET sits at the end of a chunk, after every
real token of it, so the chunk-local cumulative decays of real tokens never contain it (no digits lost);
the kernels take exp(b_t - b_s) for s <= t only, masking the rest before the exp. The forward and the
backward are the unchanged kernels (GLA's and the mLSTM's backward sum their decay gradients within
each document, `reverse_cumsum`); the cost is at most L padding tokens per document.

Layout as fla's: q (1, N, H, K) etc. over the N flattened tokens, cu_seqlens (D + 1,) [0, ..., N].
"""

from __future__ import annotations

import functools

import torch

RESET = -1e4  # a log decay whose exp underflows to 0 in fp32 (below about -104) and stays finite


class ChunkAligned:
    def __init__(self, cu_seqlens: torch.Tensor, chunk_size: int, device):
        cu = torch.as_tensor(cu_seqlens).to("cpu", torch.int64)
        lengths = cu[1:] - cu[:-1]
        padded = (lengths // chunk_size + 1) * chunk_size  # at least one padding token: the reset slot
        ends = padded.cumsum(0)
        starts = ends - padded
        self.length = int(ends[-1])
        n_tokens = int(cu[-1])
        self.slots = (torch.repeat_interleave(starts - cu[:-1], lengths) + torch.arange(n_tokens)).to(device)
        reset = torch.zeros(self.length, dtype=torch.bool)
        reset[ends - 1] = True
        self.reset = reset.to(device)
        # Each slot's reset slot: a reverse cumulative sum over a document runs up to it, not through it (its
        # decay is a constant, and the mLSTM's stabiliser makes d loss / d b there the opposite of the next
        # document's first token's, so including it would leak that token's gradient back).
        self.doc_end = torch.repeat_interleave(ends - 1, padded).to(device)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(1, N, ...) tokens -> (1, length, ...) chunk-aligned documents, zeros between them."""
        return x.new_zeros(self.length, *x.shape[2:]).index_copy(0, self.slots, x[0])[None]

    def pack_decay(self, g: torch.Tensor) -> torch.Tensor:
        """Log decays (1, N, H[, K]) -> packed, with RESET at the end of every document's padding. (The
        mLSTM's forget-gate pre-activations too: logsigmoid(RESET) = RESET.)"""
        reset = self.reset.view(1, -1, *[1] * (g.dim() - 2))
        return torch.where(reset, RESET, self.pack(g.float()))

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        """(1, length, ...) -> (1, N, ...): each token's output back in its place."""
        return y[0].index_select(0, self.slots)[None]

    def reverse_cumsum(self, x: torch.Tensor) -> torch.Tensor:
        """sum over t' >= t in t's document of x (n, length, ...) (time on dim 1), exact: in fp64, as a
        difference of suffix sums over the row (the later documents' terms cancel in exact arithmetic only)."""
        suffix = x.double().flip(1).cumsum(1).flip(1)
        return (suffix - suffix.index_select(1, self.doc_end)).to(x.dtype)


@functools.lru_cache(maxsize=16)
def _layout(cu_seqlens: tuple[int, ...], chunk_size: int, device) -> ChunkAligned:
    """One layout per batch and chunk size, shared by every layer (built on the CPU, copied once)."""
    return ChunkAligned(torch.tensor(cu_seqlens), chunk_size, device)


def packed_call(run, cu_seqlens, chunk_size: int, initial_state, q, k, v, g, *rest) -> tuple[torch.Tensor, None]:
    """The varlen form of a chunk op: o (1, N, H, V) of `run(layout, q, k, v, g, *rest)` (the packed
    tensors, g with its resets; returns packed o), and no final state. Raises ValueError unless the call
    follows fla's varlen contract."""
    cu_seqlens = torch.as_tensor(cu_seqlens).cpu()
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens the batch is the flattened tokens, (1, N, ...); got batch {q.shape[0]}")
    if int(cu_seqlens[-1]) != q.shape[1]:
        raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])}, but there are {q.shape[1]} tokens")
    if initial_state is not None:
        raise ValueError("an initial state with cu_seqlens is not supported: packed documents start from zero")
    lay = _layout(tuple(cu_seqlens.tolist()), chunk_size, q.device)
    o = run(lay, lay.pack(q), lay.pack(k), lay.pack(v), lay.pack_decay(g), *(lay.pack(t) for t in rest))
    return lay.unpack(o), None


def packed_call_heads_first(run, cu_seqlens, chunk_size: int, initial_state, q, k, v, f, *rest):
    """`packed_call` for an op in the heads-first layout (1, NH, N, ...), the mLSTM's: `run` takes and returns
    heads-first packed tensors (f, the forget-gate pre-activation, with its resets)."""
    flip = lambda t: t.transpose(1, 2)  # noqa: E731 - heads-first <-> fla's time-first, where packing runs
    h, _ = packed_call(lambda layout, *packed: flip(run(layout, *map(flip, packed))), cu_seqlens, chunk_size,
                       initial_state, *map(flip, (q, k, v, f, *rest)))
    return flip(h), None
