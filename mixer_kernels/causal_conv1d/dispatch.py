"""Picks the causal conv path (mixer_kernels/backend.py): causal-conv1d's CUDA kernels on a GPU, the reference else.

causal-conv1d carries states only in the channel-last layout (stride 1 along C), and there it needs the
channel count and the batch and time strides to be multiples of 8. `conv_with` removes both constraints,
as mamba-ssm's `ensure_stride` does for the strides: the input is copied into a contiguous channel-last
buffer when its strides do not fit, and zero channels pad C up to a multiple of 8 (their outputs are
dropped), so every width the config allows (2 to 4, checked by models/config.py) runs on the GPU.
"""

import torch
import torch.nn.functional as F

from mixer_kernels.backend import choose, fast_function
from mixer_kernels.causal_conv1d.reference import (
    causal_conv1d_ref,
    causal_conv1d_update_ref,
    last_document_state,
    padded_seq_idx,
)

WIDTHS = (2, 3, 4)  # what causal-conv1d's kernels take (models/config.py checks it)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    activation: str | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv. x: (B, C, T); weight: (C, W); initial_state: (B, C, W-1) or None; seq_idx
    (B, T) int32 document index per token (packed documents: no tap reaches into another) or None.

    Returns y (B, C, T) and the final state (B, C, W-1).
    """
    choice = choose("causal_conv1d", x)
    if not choice.fast:
        return causal_conv1d_ref(x, weight, bias, initial_state, activation, seq_idx)
    return conv_with(fast_function(choice), x, weight, bias, initial_state, activation, seq_idx)


def _channel_last(t: torch.Tensor, pad: int) -> torch.Tensor:
    """(B, C, L) -> the same values with `pad` zero channels appended, stored channel-last and contiguous."""
    return F.pad(t.transpose(1, 2), (0, pad)).contiguous().transpose(1, 2)  # pad 0 may return a view


def conv_with(fn, x, weight, bias, initial_state, activation, seq_idx=None):
    """`causal_conv1d` through causal-conv1d's `causal_conv1d_fn` (`fn`); a function of its own so that the
    tests can run it with a stand-in that checks the package's layout rules on CPU tensors."""
    channels = x.shape[1]
    pad = -channels % 8
    if pad or x.stride(1) != 1 or x.stride(0) % 8 or x.stride(2) % 8:
        x = _channel_last(x, pad)
    if pad:
        weight = F.pad(weight, (0, 0, 0, pad))
        bias = None if bias is None else F.pad(bias, (0, pad))
    if initial_state is not None:
        initial_state = initial_state.to(x.dtype)
        if pad or initial_state.stride(1) != 1:
            initial_state = _channel_last(initial_state, pad)
    if seq_idx is None:
        y, state = fn(x, weight, bias, initial_states=initial_state, return_final_states=True, activation=activation)
    else:  # the package returns no final state with seq_idx: the last document's last inputs, taken here
        y = fn(x, weight, bias, seq_idx=seq_idx.to(torch.int32).contiguous(), initial_states=initial_state,
               activation=activation)
        width = weight.shape[1]
        before = x.new_zeros(*x.shape[:2], width - 1) if initial_state is None else initial_state
        state = last_document_state(torch.cat([before, x[..., -(width - 1):]], dim=-1),
                                    padded_seq_idx(seq_idx, width, initial_state is not None), seq_idx, width)
    return (y[:, :channels], state[:, :channels]) if pad else (y, state)


def causal_conv1d_update(
    x_t: torch.Tensor,
    state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step. x_t: (B, C); state: (B, C, W-1) -> y_t (B, C), new state (B, C, W-1)."""
    choice = choose("causal_conv1d_update", x_t)
    if not choice.fast:
        return causal_conv1d_update_ref(x_t, state, weight, bias, activation)
    state = state.to(x_t.dtype, copy=True)  # the kernel shifts the state in place; callers keep theirs
    return fast_function(choice)(x_t, state, weight, bias, activation), state
