"""Softmax attention: flash-attn on CUDA when the `cuda` extra is installed, SDPA with boolean masks otherwise.

`reference.py` is the spec (masks for causal, sliding-window, block-causal and per-document attention, and
the checkpoint attention of SCOUT); `dispatch.py` picks the path per call.
"""

from mixer_kernels.attention.dispatch import (
    attention,
    causal_attention,
    checkpoint_attention,
    packed_attention,
)

__all__ = ["attention", "causal_attention", "checkpoint_attention", "packed_attention"]
