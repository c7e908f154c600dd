"""The GLA dispatcher (mixer_kernels/backend.py, op `gla`): the Triton chunk kernel on CUDA, else the PyTorch reference.

`gla_step` (op `gla_step`) always uses the reference: a decoding step is one rank-one update, memory bound
and tiny.
"""

from __future__ import annotations

import torch

from mixer_kernels.backend import choose
from mixer_kernels.gla import reference

# Default chunks (speed only, same result): the Triton kernel keeps its (L, L, K) pairwise decay tile in
# registers, so it takes short chunks; the PyTorch form is faster on the CPU with longer ones.
TRITON_CHUNK, REFERENCE_CHUNK = 16, 32
# What the Triton kernel takes (models/config.py checks it), as compiled by mixer_kernels/aot.py: chunks of 16
# (tl.dot's minimum; at 32 the fp32 kernels need more shared memory than an A100 has at K = 256, and at 64
# the (L, L, BK) pairwise tiles spill 15-20 KB a thread), key dims up to 256 (the whole key dim is one
# state tile).
TRITON_CHUNK_SIZES, TRITON_MAX_KEY_DIM = (16,), 256

def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise GLA over a whole sequence, differentiable.

    q, k, g: (B, T, H, K) with g the log decay (<= 0); v: (B, T, H, V); initial_state (B, H, K, V) fp32
    or None; scale defaults to K ** -0.5. Returns o (B, T, H, V) in v's dtype and the final fp32 state.
    chunk_size: None picks each backend's own (16 for Triton, 32 for the reference); speed only.
    cu_seqlens: packed documents (fla's varlen layout, B = 1 over the flattened tokens; CPU int tensor),
    each run as if alone in one call (mixer_kernels/varlen.py); then no final state (None).
    """
    if choose("gla", q).fast:
        from mixer_kernels.gla.triton import chunk_gla_triton

        return chunk_gla_triton(q, k, v, g, scale, initial_state, chunk_size or TRITON_CHUNK, cu_seqlens)
    return reference.gla_chunk(q, k, v, g, scale, initial_state, chunk_size or REFERENCE_CHUNK, cu_seqlens)


def gla_step(q_t, k_t, v_t, g_t, state, scale: float | None = None):
    """One decoding step: q_t, k_t, g_t (B, H, K); v_t (B, H, V); state (B, H, K, V) -> o_t, state."""
    choose("gla_step", q_t)
    return reference.gla_step(q_t, k_t, v_t, g_t, state, scale)
