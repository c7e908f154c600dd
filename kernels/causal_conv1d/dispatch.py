"""Picks the causal conv path: causal-conv1d's CUDA kernels when asked for or on a GPU, the reference else."""

import torch

from kernels.backend import cuda_function
from kernels.causal_conv1d.reference import causal_conv1d_ref, causal_conv1d_update_ref


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    activation: str | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv. x: (B, C, T); weight: (C, W); initial_state: (B, C, W-1) or None.

    Returns y (B, C, T) and the final state (B, C, W-1). backend: None, 'auto', 'cuda' or 'reference'.
    """
    fn = cuda_function("causal_conv1d", x, backend, "causal_conv1d", "causal_conv1d_fn")
    if fn is None:
        return causal_conv1d_ref(x, weight, bias, initial_state, activation)
    # The kernel carries states only in the channel-last layout (stride 1 along C), which a transposed
    # (B, T, C) projection already has; anything else is copied into it.
    if x.stride(1) != 1:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    if initial_state is not None and initial_state.stride(1) != 1:
        initial_state = initial_state.transpose(1, 2).contiguous().transpose(1, 2)
    if initial_state is not None:
        initial_state = initial_state.to(x.dtype)
    return fn(x, weight, bias, initial_states=initial_state, return_final_states=True, activation=activation)


def causal_conv1d_update(
    x_t: torch.Tensor,
    state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step. x_t: (B, C); state: (B, C, W-1) -> y_t (B, C), new state (B, C, W-1)."""
    fn = cuda_function("causal_conv1d_update", x_t, backend, "causal_conv1d", "causal_conv1d_update")
    if fn is None:
        return causal_conv1d_update_ref(x_t, state, weight, bias, activation)
    state = state.to(x_t.dtype, copy=True)  # the kernel shifts the state in place; callers keep theirs
    return fn(x_t, state, weight, bias, activation), state
