"""Picks the attention path (mixer_kernels/backend.py): flash-attn on CUDA bf16/fp16 tensors, else SDPA with masks.

flash-attn (the `cuda` extra) is imported lazily through mixer_kernels/backend.py, here and nowhere else. It
covers causal attention with a key prefix (its causal mask is aligned bottom-right, i.e. to positions
q_offset + i when Tk = q_offset + Tq), sliding windows (`window_size`), and packed documents and
block-causal masks through `flash_attn_varlen_func` with `cu_seqlens` (a block-causal mask is varlen
attention whose boundaries are the block starts). Head sizes that are not a multiple of 8 are padded by
flash-attn itself; head sizes above 256 are refused by the config schema (models/config.py).
"""

import torch

from mixer_kernels.attention.reference import attention_ref, checkpoint_attention_ref, packed_attention_ref
from mixer_kernels.backend import choose, load_function

FLASH_MAX_HEAD_DIM = 256


def _boundaries(t: int, block_size: int | None, cu_seqlens: torch.Tensor | None, device) -> torch.Tensor:
    """int32 cu_seqlens of one row of t tokens: document starts and block starts merged."""
    starts = [torch.tensor([0, t], device=device)]
    if block_size is not None:
        starts.append(torch.arange(0, t, block_size, device=device))
    if cu_seqlens is not None:
        starts.append(cu_seqlens.to(device))
    return torch.unique(torch.cat(starts)).to(torch.int32)  # sorted


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offset: int = 0,
    window: int | None = None,
    block_size: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal softmax attention, optionally windowed, block-causal or per document (see reference.py).

    q: (B, H, Tq, D); k, v: (B, H_kv, Tk, D) with Tk = q_offset + Tq and H % H_kv == 0; cu_seqlens:
    (n_docs + 1,) int, the same document layout in every row. Returns (B, H, Tq, D).

    >>> q = k = v = torch.randn(1, 4, 10, 16)
    >>> attention(q, k, v, window=3).shape
    torch.Size([1, 4, 10, 16])
    """
    tq, tk = q.shape[-2], k.shape[-2]
    if tk != q_offset + tq:
        raise ValueError(f"attention: Tk={tk} keys must be q_offset={q_offset} + Tq={tq} (a prefix, then the queries)")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    if window is not None and window < 1 or block_size is not None and block_size < 1:
        raise ValueError(f"attention: window={window} and block_size={block_size} must be >= 1 when given")
    varlen = block_size is not None or cu_seqlens is not None
    unmet = None
    if q.shape[-1] > FLASH_MAX_HEAD_DIM:
        unmet = f"flash-attn takes head_dim <= {FLASH_MAX_HEAD_DIM}, not {q.shape[-1]}"
    elif varlen and q_offset:
        unmet = "flash-attn's varlen path takes no key prefix (q_offset > 0)"
    if not choose("attention", q, unmet).fast:
        return attention_ref(q, k, v, q_offset, window, block_size, cu_seqlens)
    fn = load_function("flash_attn", "flash_attn_varlen_func" if varlen else "flash_attn_func")[0]
    return flash_with(fn, q, k, v, window, block_size, cu_seqlens)


def flash_with(fn, q, k, v, window, block_size, cu_seqlens):
    """`attention` through flash-attn's `flash_attn_func`, or `flash_attn_varlen_func` when there are blocks or
    documents (`fn`); a function of its own so that the tests run the call through the package on the CPU."""
    window_size = (-1, -1) if window is None else (window - 1, 0)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # flash-attn's layout: (B, T, H, D)
    if block_size is None and cu_seqlens is None:
        return fn(q, k, v, causal=True, window_size=window_size).transpose(1, 2)
    b, t = q.shape[:2]
    row = _boundaries(t, block_size, cu_seqlens, q.device)  # (n + 1,)
    cu = torch.cat([row[:-1] + i * t for i in range(b)] + [row[-1:] + (b - 1) * t])  # every row packed
    max_len = int((row[1:] - row[:-1]).max())
    out = fn(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, max_len, max_len, causal=True,
             window_size=window_size)  # (B * T, H, D)
    return out.unflatten(0, (b, t)).transpose(1, 2)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
    """q: (B, H, Tq, D); k, v: (B, H_kv, Tk, D), Tk = q_offset + Tq. Returns (B, H, Tq, D)."""
    return attention(q, k, v, q_offset)


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_len: int,
    window: int | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_len_k: int | None = None,
) -> torch.Tensor:
    """Causal attention inside each packed document (models/documents.py): q (N_tokens, H, D), k, v
    (N_tokens, H_kv, D), cu_seqlens (n_docs + 1,) int32 over the tokens, on their device; max_len the longest
    document. Returns (N_tokens, H, D).

    cu_seqlens_k, max_len_k: the keys' own layout, when each document's queries are the last of its keys
    (context parallelism: a piece's queries read their document's keys from earlier pieces too); the causal
    mask is aligned to the end of each document, as flash-attn aligns it.

    flash-attn's `flash_attn_varlen_func` on CUDA; else SDPA one document at a time, so memory grows with
    the longest document, never with a (T, T) mask."""
    unmet = None
    if q.shape[-1] > FLASH_MAX_HEAD_DIM:
        unmet = f"flash-attn takes head_dim <= {FLASH_MAX_HEAD_DIM}, not {q.shape[-1]}"
    if cu_seqlens_k is None:
        cu_seqlens_k, max_len_k = cu_seqlens, max_len
    if not choose("attention", q, unmet).fast:
        return packed_attention_ref(q, k, v, cu_seqlens, window, cu_seqlens_k)
    fn = load_function("flash_attn", "flash_attn_varlen_func")[0]
    return flash_packed(fn, q, k, v, cu_seqlens, max_len, window, cu_seqlens_k, max_len_k)


def flash_packed(fn, q, k, v, cu_seqlens, max_len, window, cu_seqlens_k=None, max_len_k=None):
    """`packed_attention` through flash-attn's `flash_attn_varlen_func` (`fn`); the tests run it on the CPU."""
    window_size = (-1, -1) if window is None else (window - 1, 0)
    if cu_seqlens_k is None:
        cu_seqlens_k, max_len_k = cu_seqlens, max_len
    return fn(q, k, v, cu_seqlens, cu_seqlens_k, max_len, max_len_k, causal=True, window_size=window_size)


def checkpoint_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ck: torch.Tensor,
    cv: torch.Tensor,
    n_visible: torch.Tensor,
) -> torch.Tensor:
    """Own key plus a visible prefix of summary keys (SCOUT); shapes in reference.checkpoint_attention_ref.

    One path on every device: two matmuls over T x N scores (N summaries, far fewer than T) that cuBLAS
    runs well; flash-attn has no mask of this shape.
    """
    choose("checkpoint_attention", q)
    return checkpoint_attention_ref(q, k, v, ck, cv, n_visible)
