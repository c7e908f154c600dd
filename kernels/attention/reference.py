"""Reference causal attention on PyTorch's scaled_dot_product_attention (any device, any dtype)."""

import torch
import torch.nn.functional as F


def causal_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
    """Causal attention where query i sits at absolute position q_offset + i and key j at position j.

    q: (B, H, Tq, D); k, v: (B, H, Tk, D) with Tk = q_offset + Tq (a KV cache followed by new keys).
    Returns (B, H, Tq, D).
    """
    tq, tk = q.shape[-2], k.shape[-2]
    if q_offset == 0 and tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # SDPA's is_causal aligns the mask top-left; a cache needs it aligned to the absolute positions.
    q_pos = torch.arange(q_offset, q_offset + tq, device=q.device)[:, None]
    k_pos = torch.arange(tk, device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=k_pos <= q_pos)
