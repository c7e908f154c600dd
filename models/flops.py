"""The FLOP-counting convention behind every `flops_per_token(seq_len)` in models/ (mixers, FFN, LM head).

Counted: matmul-class work, 2 FLOPs per multiply-add of a matmul, a linear layer or a convolution: the op
classes torch's FlopCounterMode counts, and what a GPU's tensor-core peak (MFU's denominator) is about.
Not counted: elementwise ops, norms, softmax, gates, the FFT of BST's SSM, and elementwise pairwise
products such as GLA's intra-chunk q.k with per-key decays (the Triton kernel forms those without a matmul).

Attention counts every key a query's mask can reach, without halving for causality (PaLM's and
torchtitan's 12 * L * H * d * T convention): T keys for full attention, min(W, T) for a window of W.
Chunked recurrences count their chunk algorithm at the chunk size of the fast path: an L x L block per
chunk (min(L, T) keys per token) plus the state terms. The backward of a matmul costs twice its forward,
so training costs 3 x forward (`TRAINING_FACTOR`).
"""

TRAINING_FACTOR = 3


def linear(d_in: int, d_out: int) -> int:
    """A linear layer on one token."""
    return 2 * d_in * d_out


def chunk_width(chunk: int, seq_len: int) -> int:
    """Keys per token inside a chunk of the chunked algorithm (the whole chunk block, as computed)."""
    return min(chunk, seq_len)
