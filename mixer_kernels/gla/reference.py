"""Gated linear attention (GLA) with a decay per key dimension, in plain PyTorch: the readable spec.

This is the recurrence behind HGRN2 (forget gate as decay, `1 - f` as key, the output-gate path as
query) and behind MoM's GLA memories. Per head, with the state S of shape (K, V):

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T            g_t <= 0: log decay per key dimension
    o_t = scale * S_t^T q_t

Owns three forms that must agree numerically:

- `gla_step`: one token (generation);
- `gla_recurrent`: the loop over `gla_step` (the definition);
- `gla_chunk`: chunks of `chunk_size` tokens in parallel and a recurrence between chunks (training and
  prefill on the CPU, and the spec the Triton kernel is tested against).

Layout and state contract are flash-linear-attention's `chunk_gla`: q, k, g (B, T, H, K), v (B, T, H, V);
`initial_state` / `final_state` (B, H, K, V), always fp32. All math is fp32; o comes back in v's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixer_kernels.varlen import packed_call

BLOCK_ELEMENTS = 2**18  # decay elements of the chunks built together (speed only: they stay in cache)


def check_inputs(q, k, v, g, initial_state=None) -> None:
    """Raise ValueError unless the shapes follow the contract in the module docstring."""
    if q.dim() != 4:
        raise ValueError(f"q must be (B, T, H, K), got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    if T == 0:
        raise ValueError("the sequence is empty (T = 0)")
    if k.shape != q.shape or g.shape != q.shape:
        raise ValueError(f"k {tuple(k.shape)} and g {tuple(g.shape)} must match q {tuple(q.shape)}")
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be (B, T, H, V) = ({B}, {T}, {H}, V), got {tuple(v.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, K, v.shape[-1]):
        raise ValueError(
            f"initial_state must be (B, H, K, V) = {(B, H, K, v.shape[-1])}, got {tuple(initial_state.shape)}"
        )


def zero_state(batch: int, heads: int, dk: int, dv: int, device=None) -> torch.Tensor:
    return torch.zeros(batch, heads, dk, dv, dtype=torch.float32, device=device)


def gla_step(q_t, k_t, v_t, g_t, state, scale: float | None = None):
    """One token. q_t, k_t, g_t (B, H, K); v_t (B, H, V); state (B, H, K, V) fp32 or None.
    Returns o_t (B, H, V) in v's dtype and the new fp32 state."""
    scale = q_t.shape[-1] ** -0.5 if scale is None else scale
    if state is None:
        state = zero_state(q_t.shape[0], q_t.shape[1], q_t.shape[2], v_t.shape[-1], q_t.device)
    state = state * g_t.float().exp()[..., None] + k_t.float()[..., None] * v_t.float()[..., None, :]
    o_t = torch.einsum("bhk,bhkv->bhv", q_t.float() * scale, state)
    return o_t.to(v_t.dtype), state


def gla_recurrent(q, k, v, g, scale: float | None = None, initial_state=None):
    """Token-by-token GLA (the definition). Shapes as in the module docstring."""
    check_inputs(q, k, v, g, initial_state)
    state, outs = initial_state, []
    for t in range(q.shape[1]):
        o_t, state = gla_step(q[:, t], k[:, t], v[:, t], g[:, t], state, scale)
        outs.append(o_t)
    return torch.stack(outs, dim=1), state


def gla_chunk(q, k, v, g, scale: float | None = None, initial_state=None, chunk_size: int = 32, cu_seqlens=None):
    """Chunkwise GLA, differentiable. Shapes as in the module docstring; with `cu_seqlens` (packed
    documents, fla's varlen layout: B = 1 over the flattened tokens) each document runs as if alone
    (mixer_kernels/varlen.py) and no final state is returned.

    Inside a chunk, with b the cumulative log decay from the chunk start (per key dimension):
        o_t = scale * [ (q_t * exp(b_t)) S_c + sum_{s<=t} (sum_k q_t k_s exp(b_t - b_s)) v_s ]
        S_{c+1} = exp(b_L) S_c + sum_s (k_s * exp(b_L - b_s)) v_s^T
    The intra-chunk weights are formed pairwise, exp(b_t - b_s) with s <= t, never as exp(b_t) times
    exp(-b_s): with strong decay (forget gates near 0) exp(-b_s) overflows fp32 within one chunk.
    """
    check_inputs(q, k, v, g, initial_state)
    if cu_seqlens is not None:
        return packed_call(lambda _, *qkvg: gla_chunk(*qkvg, scale, None, chunk_size)[0], cu_seqlens, chunk_size,
                           initial_state, q, k, v, g)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    L, dtype = chunk_size, v.dtype
    pad = -T % L
    # (B, H, NC, L, D): padded tokens have q = k = v = 0 and g = 0, so they change nothing.
    q, k, v, g = (F.pad(x.float(), (0, 0, 0, 0, 0, pad)).transpose(1, 2) for x in (q, k, v, g))
    q, k, v, g = (x.reshape(B, H, -1, L, x.shape[-1]) for x in (q, k, v, g))
    q = q * scale
    b = g.cumsum(-2)  # (B, H, NC, L, K)
    b_last = b[..., -1, :]  # (B, H, NC, K)
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    state = zero_state(B, H, K, V, q.device) if initial_state is None else initial_state.float()
    outs = []
    # A block of chunks at a time, as many as keep their (L, L, K) decays in cache; inside a block everything
    # that does not need the chunk-start state is batched, and the loop over chunks only carries the state.
    block = max(1, BLOCK_ELEMENTS // (B * H * L * L * K))
    for c0 in range(0, q.shape[2], block):
        qb, kb, vb, bb, lastb = (x[:, :, c0:c0 + block] for x in (q, k, v, b, b_last))  # (B, H, nb, L, D)
        # (B, H, nb, L, L, K): exp(b_t - b_s) on and below the diagonal, 0 above (where it could overflow).
        decay = torch.where(causal[..., None], bb[..., :, None, :] - bb[..., None, :, :], -torch.inf).exp()
        attn = (qb[..., :, None, :] * kb[..., None, :, :] * decay).sum(-1)  # (B, H, nb, L, L)
        writes = (kb * (lastb[..., None, :] - bb).exp()).transpose(-1, -2) @ vb  # (B, H, nb, K, V)
        starts = []
        for decay_c, writes_c in zip(lastb.exp()[..., None].unbind(2), writes.unbind(2)):
            starts.append(state)
            state = torch.addcmul(writes_c, decay_c, state)
        outs.append((qb * bb.exp()) @ torch.stack(starts, dim=2) + attn @ vb)  # (B, H, nb, L, V)
    o = torch.cat(outs, dim=2).reshape(B, H, -1, V)[:, :, :T].transpose(1, 2)
    return o.to(dtype), state
