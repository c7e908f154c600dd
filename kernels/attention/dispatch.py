"""Picks the causal attention path: flash-attn for CUDA half-precision tensors when installed, else SDPA."""

import functools
import logging

import torch

from kernels.attention.reference import causal_attention_ref

log = logging.getLogger(__name__)


@functools.cache
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func  # CUDA-only package, from the `cuda` extra
    except ImportError:
        return None
    return flash_attn_func


@functools.cache
def _log_choice(path: str) -> None:
    log.info("causal attention uses %s", path)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
    """q: (B, H, Tq, D); k, v: (B, H, Tk, D), Tk = q_offset + Tq. Returns (B, H, Tq, D)."""
    flash = _flash_attn_func() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
    if flash is not None and q_offset == 0:
        _log_choice("flash-attn")
        # flash-attn takes (B, T, H, D) and aligns the causal mask bottom-right, as a KV cache needs.
        out = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return out.transpose(1, 2)
    _log_choice("scaled_dot_product_attention")
    return causal_attention_ref(q, k, v, q_offset)
