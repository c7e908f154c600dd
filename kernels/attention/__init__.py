"""Causal softmax attention: flash-attn on CUDA when the `cuda` extra is installed, SDPA otherwise."""

from kernels.attention.dispatch import causal_attention

__all__ = ["causal_attention"]
