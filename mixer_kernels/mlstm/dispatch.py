"""The mLSTM dispatcher (mixer_kernels/backend.py, op `mlstm`): the Triton chunkwise kernel on CUDA, else PyTorch.

`mlstm_recurrent_step` (op `mlstm_step`) and `mlstm_parallel` always use the reference: a decoding step is
memory bound and tiny; the parallel form is for tests.
"""

from __future__ import annotations

import torch

from mixer_kernels.backend import choose
from mixer_kernels.mlstm import reference
from mixer_kernels.mlstm.reference import MLSTMState

# What the Triton kernel takes (models/config.py checks it): powers of two >= 16, tl.dot's minimum, and at
# most 64: the dq/dk/dv kernel's (L, L) tiles at 128 spill 650-830 bytes a thread at every tiling tried,
# over the backward budget of tests/kernels/test_aot.py.
TRITON_CHUNK_SIZES = (16, 32, 64)

def mlstm_chunkwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i_preact: torch.Tensor,
    f_preact: torch.Tensor,
    initial_state: MLSTMState | None = None,
    chunk_size: int = 64,
    eps: float = 1e-6,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, MLSTMState]:
    """Chunkwise mLSTM over a whole sequence, differentiable.

    q, k: (B, NH, T, DQK); v: (B, NH, T, DV); i_preact, f_preact: (B, NH, T) raw gate
    pre-activations; initial_state: (C (B,NH,DQK,DV), n (B,NH,DQK), m (B,NH,1)) fp32, or None.
    Returns h (B, NH, T, DV) in q's dtype and the final fp32 state (C, n, m). cu_seqlens: packed
    documents (B = 1, the flattened tokens on the time axis; CPU int tensor), each a fresh sequence in
    one call (mixer_kernels/varlen.py); then no final state (None).
    """
    if choose("mlstm", q).fast:
        from mixer_kernels.mlstm.triton import mlstm_chunkwise_triton

        return mlstm_chunkwise_triton(q, k, v, i_preact, f_preact, initial_state, chunk_size, eps, cu_seqlens)
    return reference.mlstm_chunkwise(q, k, v, i_preact, f_preact, initial_state, chunk_size, eps,
                                     cu_seqlens=cu_seqlens)


def mlstm_recurrent_step(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    i_t: torch.Tensor,
    f_t: torch.Tensor,
    state: MLSTMState | None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, MLSTMState]:
    """One decoding step. q_t, k_t (B,NH,DQK); v_t (B,NH,DV); i_t, f_t (B,NH) -> h_t (B,NH,DV), state."""
    choose("mlstm_step", q_t)
    return reference.mlstm_recurrent_step(q_t, k_t, v_t, i_t, f_t, state, eps)


def mlstm_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i_preact: torch.Tensor,
    f_preact: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Quadratic mLSTM without state, for tests: (B,NH,T,DQK) x2, (B,NH,T,DV), (B,NH,T) x2 -> h."""
    return reference.mlstm_parallel(q, k, v, i_preact, f_preact, eps)
