"""mixer_kernels/attention on the CPU: every masked path (causal, sliding window, block-causal, packed documents,
key prefix, grouped-query heads) and SCOUT's checkpoint attention equal a naive masked softmax written here."""

import pytest
import torch

from mixer_kernels.attention import attention, causal_attention, checkpoint_attention


def naive_attention(q, k, v, allowed):
    """q (B, H, Tq, D); k, v (B, H_kv, Tk, D); allowed (Tq, Tk) bool. Plain softmax(q k^T / sqrt(D)) v."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v


def allowed_pairs(tq, tk, q_offset=0, window=None, block=None, docs=None):
    """The mask spelled out pair by pair, independently of the kernel's vectorised one."""
    doc_of = None
    if docs is not None:
        doc_of = [i for i, (a, b) in enumerate(zip(docs[:-1], docs[1:])) for _ in range(a, b)]
    out = torch.zeros(tq, tk, dtype=torch.bool)
    for i in range(tq):
        p = q_offset + i
        for j in range(tk):
            ok = j <= p
            ok &= window is None or p - j < window
            ok &= block is None or p // block == j // block
            ok &= doc_of is None or doc_of[p] == doc_of[j]
            out[i, j] = ok
    return out


def qkv(tq, tk, heads=4, kv_heads=4, d=16, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, tq, d, generator=g)
    k, v = (torch.randn(b, kv_heads, tk, d, generator=g) for _ in range(2))
    return q, k, v


CASES = {  # id: (Tq, Tk, attention kwargs)
    "causal": (37, 37, {}),
    "causal-prefix": (5, 37, {"q_offset": 32}),
    "window": (37, 37, {"window": 6}),
    "window-prefix": (3, 11, {"q_offset": 8, "window": 4}),
    "block-causal": (37, 37, {"block_size": 8}),
    "block-causal-prefix": (4, 21, {"q_offset": 17, "block_size": 8}),
    "varlen": (37, 37, {"cu_seqlens": [0, 5, 6, 20, 37]}),
    "varlen-window-blocks": (37, 37, {"cu_seqlens": [0, 13, 37], "window": 5, "block_size": 9}),
}


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_masked_attention_equals_naive_softmax(case, kv_heads):
    tq, tk, kw = CASES[case]
    q, k, v = qkv(tq, tk, kv_heads=kv_heads)
    docs = kw.get("cu_seqlens")
    args = {**kw, "cu_seqlens": None if docs is None else torch.tensor(docs)}
    allowed = allowed_pairs(tq, tk, kw.get("q_offset", 0), kw.get("window"), kw.get("block_size"), docs)
    torch.testing.assert_close(attention(q, k, v, **args), naive_attention(q, k, v, allowed), atol=1e-6, rtol=1e-6)


def test_causal_attention_keeps_its_signature():
    q, k, v = qkv(7, 19)
    torch.testing.assert_close(causal_attention(q, k, v, q_offset=12), naive_attention(q, k, v, allowed_pairs(7, 19, 12)),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_checkpoint_attention_equals_naive_softmax(kv_heads):
    """Keys [summaries; own keys] with the mask [summary j visible iff j < n_visible[i]] | [own key only]."""
    t, n = 29, 6
    q, k, v = qkv(t, t, kv_heads=kv_heads)
    _, ck, cv = qkv(n, n, kv_heads=kv_heads, seed=1)
    n_visible = torch.arange(t) // 5
    allowed = torch.cat([torch.arange(n)[None, :] < n_visible[:, None], torch.eye(t, dtype=torch.bool)], dim=1)
    want = naive_attention(q, torch.cat([ck, k], 2), torch.cat([cv, v], 2), allowed)
    torch.testing.assert_close(checkpoint_attention(q, k, v, ck, cv, n_visible), want, atol=1e-6, rtol=1e-6)


def test_bad_shapes_name_the_rule():
    q, k, v = qkv(5, 9)
    with pytest.raises(ValueError, match="q_offset=0"):
        attention(q, k, v)
    with pytest.raises(ValueError, match="window=0"):
        attention(q, k, v, q_offset=4, window=0)
