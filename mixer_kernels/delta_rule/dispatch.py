"""The gated-delta-rule dispatcher (mixer_kernels/backend.py, op `delta_rule`): the Triton chunk kernel on CUDA, else
the PyTorch reference. `delta_rule_step` (op `delta_rule_step`) always uses the reference: a decoding step is
memory bound and tiny.
"""

from __future__ import annotations

import torch

from mixer_kernels.backend import choose
from mixer_kernels.delta_rule import reference

TRITON_CHUNK, REFERENCE_CHUNK = 16, 64  # default chunks of each path (speed only, same result)
# What the Triton kernel takes (models/config.py checks it), as compiled by mixer_kernels/aot.py: chunks of 16 (at
# 32 the backward chunk kernel needs 168 KiB of shared memory at K = V = 256, past an A100's 163 KiB), key dims
# up to 256 (the whole key dim is one state tile).
TRITON_CHUNK_SIZES, TRITON_MAX_KEY_DIM = (16,), 256

def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise gated delta rule over a whole sequence, differentiable.

    q, k: (B, T, H, K) with k L2-normalised; v: (B, T, H, V); g (log decay <= 0), beta: (B, T, H);
    initial_state (B, H, K, V) fp32 or None; scale defaults to K ** -0.5. Returns o (B, T, H, V) in v's
    dtype and the final fp32 state. chunk_size: None picks each backend's own (16 Triton, 64 reference).
    cu_seqlens: packed documents (fla's varlen layout, B = 1 over the flattened tokens; CPU int tensor),
    each run as if alone in one call (mixer_kernels/varlen.py); then no final state (None).
    """
    if choose("delta_rule", q).fast:
        from mixer_kernels.delta_rule.triton import chunk_gated_delta_rule_triton

        return chunk_gated_delta_rule_triton(q, k, v, g, beta, scale, initial_state, chunk_size or TRITON_CHUNK,
                                             cu_seqlens)
    return reference.delta_rule_chunk(q, k, v, g, beta, scale, initial_state, chunk_size or REFERENCE_CHUNK,
                                      cu_seqlens)


def delta_rule_step(q_t, k_t, v_t, g_t, beta_t, state, scale: float | None = None):
    """One decoding step: q_t, k_t (B, H, K); v_t (B, H, V); g_t, beta_t (B, H); state -> o_t, state."""
    choose("delta_rule_step", q_t)
    return reference.delta_rule_step(q_t, k_t, v_t, g_t, beta_t, state, scale)
