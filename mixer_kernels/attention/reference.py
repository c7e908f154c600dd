"""Reference softmax attention on PyTorch's scaled_dot_product_attention, with explicit boolean masks.

Every mask here is causal; the options narrow it further, and combine:

- `window=w`: sliding window, query at position p reads keys at p - w + 1 .. p (Mistral / flash-attn's
  `window_size=(w - 1, 0)`); computed by bands (`sliding_window_ref`) when the window is shorter than the
  keys, so work and memory grow as T x w, not T^2;
- `block_size=b`: block-causal, a query reads only keys of its own block of b positions (BST's in-block
  self-attention, blocks starting at position 0);
- `cu_seqlens`: packed documents (flash-attn's varlen layout), a query reads only keys of its own document.

Positions: query i sits at absolute position q_offset + i, key j at position j, Tk = q_offset + Tq (a
cache or a prefix of keys followed by the new ones). A query always reads its own position, so no row of
a mask is empty and the softmax never sees a row of -inf.

`checkpoint_attention_ref` is the other op: each query reads its own key plus a visible prefix of a shared
list of summary keys (SCOUT's checkpoints), at cost Tq x N instead of Tq x Tk.
"""

import torch
import torch.nn.functional as F


def document_ids(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """(length,) index of the document each position belongs to; cu_seqlens (n_docs + 1,) = [0, ..., total]."""
    pos = torch.arange(length, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].to(pos.dtype), pos, right=True)


def attention_mask(
    tq: int,
    tk: int,
    q_offset: int = 0,
    window: int | None = None,
    block_size: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    device=None,
) -> torch.Tensor:
    """(Tq, Tk) bool, True where query i (position q_offset + i) may read key j (position j)."""
    q_pos = torch.arange(q_offset, q_offset + tq, device=device)[:, None]
    k_pos = torch.arange(tk, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= q_pos - k_pos < window
    if block_size is not None:
        mask &= q_pos // block_size == k_pos // block_size
    if cu_seqlens is not None:
        doc = document_ids(cu_seqlens.to(device), max(tk, q_offset + tq))
        mask &= doc[q_pos] == doc[k_pos]
    return mask


# Queries of a band: each band of BAND rows reads window - 1 + BAND keys, so the work per query exceeds the
# window's by BAND / window; more rows per band mean fewer, larger matmuls.
def _band_rows(window: int) -> int:
    return max(16, window // 16)


def sliding_window_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, q_offset: int = 0) -> torch.Tensor:
    """Causal sliding-window attention by bands of queries, each against only the keys its window can reach.

    q: (B, H, Tq, D); k, v: (B, H_kv, Tk, D), Tk = q_offset + Tq. Returns (B, H, Tq, D), equal to the masked
    SDPA of `attention_ref`.
    """
    tq, tk = q.shape[-2], k.shape[-2]
    rows = min(_band_rows(window), tq)
    n_bands, span = -(-tq // rows), window - 1 + rows
    pad = n_bands * rows - tq
    # Key j sits at index j + window - 1 of kp; band b's queries (positions q_offset + b * rows + i) read
    # kp[q_offset + b * rows : ... + span].
    kp, vp = (F.pad(t, (0, 0, window - 1, pad))[:, :, q_offset:] for t in (k, v))
    kb, vb = (t.unfold(2, span, rows).permute(0, 2, 1, 4, 3) for t in (kp, vp))  # (B, bands, H_kv, span, D)
    qb = F.pad(q, (0, 0, 0, pad)).unflatten(2, (n_bands, rows)).transpose(1, 2)  # (B, bands, H, rows, D)
    q_pos = q_offset + torch.arange(n_bands * rows, device=q.device).view(n_bands, rows, 1)
    k_pos = (q_offset - (window - 1) + rows * torch.arange(n_bands, device=q.device).view(n_bands, 1, 1)
             + torch.arange(span, device=q.device).view(1, 1, span))
    mask = (k_pos >= 0) & (k_pos <= q_pos) & (q_pos - k_pos < window) & (k_pos < tk)  # (bands, rows, span)
    mask |= ~mask.any(-1, keepdim=True)  # padded query rows read anything: no row of -inf (dropped below)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask[:, None], enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2).flatten(2, 3)[:, :, :tq]


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offset: int = 0,
    window: int | None = None,
    block_size: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: (B, H, Tq, D); k, v: (B, H_kv, Tk, D), H % H_kv == 0 (grouped-query). Returns (B, H, Tq, D)."""
    tq, tk = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if window is None and block_size is None and cu_seqlens is None and q_offset == 0 and tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if window is not None and window < tk and block_size is None and cu_seqlens is None:
        return sliding_window_ref(q, k, v, window, q_offset)
    # SDPA's is_causal aligns the mask top-left; a cache or a key prefix needs it aligned to positions.
    mask = attention_mask(tq, tk, q_offset, window, block_size, cu_seqlens, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def causal_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
    """Causal attention, query i at position q_offset + i: q (B, H, Tq, D); k, v (B, H_kv, Tk, D)."""
    return attention_ref(q, k, v, q_offset)


def checkpoint_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ck: torch.Tensor,
    cv: torch.Tensor,
    n_visible: torch.Tensor,
) -> torch.Tensor:
    """Each query reads its own key/value and the first n_visible[i] summary keys/values, in one softmax.

    q: (B, H, T, D); k, v: (B, H_kv, T, D) the queries' own keys and values; ck, cv: (B, H_kv, N, D)
    the summary keys shared by all queries; n_visible: (T,) int in [0, N]. Returns (B, H, T, D).
    Cost and memory grow as T x N (the scores are computed against the N summaries only).
    """
    group = q.shape[1] // k.shape[1]
    if group > 1:  # grouped-query heads share their key/value head
        k, v, ck, cv = (t.repeat_interleave(group, dim=1) for t in (k, v, ck, cv))
    scale = q.shape[-1] ** -0.5
    s_sum = (q @ ck.transpose(-1, -2)) * scale  # (B, H, T, N)
    hidden = torch.arange(ck.shape[-2], device=q.device)[None, :] >= n_visible.to(q.device)[:, None]  # (T, N)
    s_sum = s_sum.masked_fill(hidden, float("-inf"))
    s_self = (q * k).sum(-1, keepdim=True) * scale  # (B, H, T, 1)
    p = torch.softmax(torch.cat([s_sum, s_self], dim=-1).float(), dim=-1).to(q.dtype)
    return p[..., :-1] @ cv + p[..., -1:] * v


def packed_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                         window: int | None = None, cu_seqlens_k: torch.Tensor | None = None) -> torch.Tensor:
    """Causal (optionally windowed) attention inside each packed document: q (N_tokens, H, D), k, v
    (N_tokens, H_kv, D), cu_seqlens (n_docs + 1,). One SDPA per document: no mask across documents is built,
    so memory grows with the longest document (SDPA's CPU flash kernel takes is_causal without a mask).
    cu_seqlens_k: the keys' layout when a document has more keys than queries (its queries are its last
    keys' positions, as flash-attn's varlen kernel aligns them)."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    bounds_k = bounds if cu_seqlens_k is None else cu_seqlens_k.tolist()
    for start, end, start_k, end_k in zip(bounds[:-1], bounds[1:], bounds_k[:-1], bounds_k[1:], strict=True):
        doc = [t[a:b].transpose(0, 1)[None] for t, a, b in ((q, start, end), (k, start_k, end_k), (v, start_k, end_k))]
        w = window if window is not None and window < end_k - start_k else None  # a shorter document: plain causal
        out[start:end] = attention_ref(*doc, q_offset=(end_k - start_k) - (end - start), window=w)[0].transpose(0, 1)
    return out
