"""The gated-delta-rule dispatcher: the Triton chunk kernel on CUDA, the PyTorch reference otherwise.

The backend is chosen per call from the environment variable `DELTA_RULE_BACKEND` (`auto`, `triton`,
`reference`), with the same rules and the same log-once behaviour as kernels/gla (whose chooser this
reuses). `delta_rule_step` always uses the reference: a decoding step is memory bound and tiny.
"""

from __future__ import annotations

import torch

from kernels.delta_rule import reference
from kernels.gla.dispatch import choose_backend

BACKEND_ENV = "DELTA_RULE_BACKEND"


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise gated delta rule over a whole sequence, differentiable.

    q, k: (B, T, H, K) with k L2-normalised; v: (B, T, H, V); g (log decay <= 0), beta: (B, T, H);
    initial_state (B, H, K, V) fp32 or None; scale defaults to K ** -0.5. Returns o (B, T, H, V) in v's
    dtype and the final fp32 state. chunk_size: None picks each backend's own (16 Triton, 64 reference).
    """
    if choose_backend(q, BACKEND_ENV, "chunk_gated_delta_rule") == "triton":
        from kernels.delta_rule.triton import chunk_gated_delta_rule_triton

        return chunk_gated_delta_rule_triton(q, k, v, g, beta, scale, initial_state, chunk_size or 16)
    return reference.delta_rule_chunk(q, k, v, g, beta, scale, initial_state, chunk_size or 64)


def delta_rule_step(q_t, k_t, v_t, g_t, beta_t, state, scale: float | None = None):
    """One decoding step: q_t, k_t (B, H, K); v_t (B, H, V); g_t, beta_t (B, H); state -> o_t, state."""
    return reference.delta_rule_step(q_t, k_t, v_t, g_t, beta_t, state, scale)
