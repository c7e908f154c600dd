"""The gated delta rule (Gated DeltaNet; MoM's default memory) in plain PyTorch: the readable spec.

Per head, with the state S of shape (K, V), a scalar log decay g_t <= 0 and a write strength beta_t:

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = scale * S_t^T q_t

(decay, then replace what S remembers for key k_t by v_t, at rate beta_t). Keys are expected to be
L2-normalised by the caller (the mixers do it), as flash-linear-attention's `use_qk_l2norm_in_kernel`.

Owns three forms that must agree numerically:

- `delta_rule_step`: one token (generation);
- `delta_rule_recurrent`: the loop over the step (the definition);
- `delta_rule_chunk`: the WY form of flash-linear-attention's `chunk_gated_delta_rule` (training and
  prefill on the CPU, and the spec the Triton kernel is tested against). Inside a chunk of L tokens,
  with gamma the cumulative log decay from the chunk start and Gamma[t, s] = exp(gamma_t - gamma_s):

      T = (I + tril(diag(beta) K K^T * Gamma, -1))^-1           (L, L), unit lower triangular
      W = T diag(beta exp(gamma)) K,   U = T diag(beta) V          the WY representation
      V_new = U - W S_c                                            what each token really writes
      O = diag(exp(gamma)) Q S_c + (Q K^T * Gamma, causal) V_new
      S_{c+1} = exp(gamma_L) S_c + (diag(exp(gamma_L - gamma)) K)^T V_new

Layout and state contract follow flash-linear-attention: q, k (B, T, H, K), v (B, T, H, V), g and beta
(B, T, H); `initial_state` / `final_state` (B, H, K, V), always fp32. All math is fp32; o comes back in
v's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixer_kernels.varlen import packed_call


def check_inputs(q, k, v, g, beta, initial_state=None) -> None:
    """Raise ValueError unless the shapes follow the contract in the module docstring."""
    if q.dim() != 4:
        raise ValueError(f"q must be (B, T, H, K), got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    if T == 0:
        raise ValueError("the sequence is empty (T = 0)")
    if k.shape != q.shape:
        raise ValueError(f"k {tuple(k.shape)} must match q {tuple(q.shape)}")
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be (B, T, H, V) = ({B}, {T}, {H}, V), got {tuple(v.shape)}")
    if g.shape != (B, T, H) or beta.shape != (B, T, H):
        raise ValueError(f"g {tuple(g.shape)} and beta {tuple(beta.shape)} must be (B, T, H) = {(B, T, H)}")
    if initial_state is not None and initial_state.shape != (B, H, K, v.shape[-1]):
        raise ValueError(
            f"initial_state must be (B, H, K, V) = {(B, H, K, v.shape[-1])}, got {tuple(initial_state.shape)}"
        )


def zero_state(batch: int, heads: int, dk: int, dv: int, device=None) -> torch.Tensor:
    return torch.zeros(batch, heads, dk, dv, dtype=torch.float32, device=device)


def delta_rule_step(q_t, k_t, v_t, g_t, beta_t, state, scale: float | None = None):
    """One token. q_t, k_t (B, H, K); v_t (B, H, V); g_t, beta_t (B, H); state (B, H, K, V) fp32 or None.
    Returns o_t (B, H, V) in v's dtype and the new fp32 state."""
    scale = q_t.shape[-1] ** -0.5 if scale is None else scale
    if state is None:
        state = zero_state(q_t.shape[0], q_t.shape[1], q_t.shape[2], v_t.shape[-1], q_t.device)
    k32, v32 = k_t.float(), v_t.float()
    state = state * g_t.float().exp()[..., None, None]
    v_new = beta_t.float()[..., None] * (v32 - torch.einsum("bhk,bhkv->bhv", k32, state))  # (B, H, V)
    state = state + k32[..., None] * v_new[..., None, :]
    o_t = torch.einsum("bhk,bhkv->bhv", q_t.float() * scale, state)
    return o_t.to(v_t.dtype), state


def delta_rule_recurrent(q, k, v, g, beta, scale: float | None = None, initial_state=None):
    """Token-by-token gated delta rule (the definition). Shapes as in the module docstring."""
    check_inputs(q, k, v, g, beta, initial_state)
    state, outs = initial_state, []
    for t in range(q.shape[1]):
        o_t, state = delta_rule_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state, scale)
        outs.append(o_t)
    return torch.stack(outs, dim=1), state


BLOCK_ELEMENTS = 2**20  # (L, L) elements of the chunks built together (speed only: they stay in cache)


def delta_rule_chunk(q, k, v, g, beta, scale: float | None = None, initial_state=None, chunk_size: int = 64,
                     cu_seqlens=None):
    """Chunkwise (WY) gated delta rule, differentiable. Shapes and math in the module docstring; with
    `cu_seqlens` (packed documents, fla's varlen layout: B = 1 over the flattened tokens) each document
    runs as if alone (mixer_kernels/varlen.py) and no final state is returned."""
    check_inputs(q, k, v, g, beta, initial_state)
    if cu_seqlens is not None:
        return packed_call(lambda _, *qkvgb: delta_rule_chunk(*qkvgb, scale, None, chunk_size)[0], cu_seqlens,
                           chunk_size, initial_state, q, k, v, g, beta)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    L, dtype = chunk_size, v.dtype
    pad = -T % L
    # (B, H, NC, L, D) / (B, H, NC, L): padded tokens have k = v = 0, beta = 0, g = 0 (no effect).
    q, k, v = (F.pad(x.float(), (0, 0, 0, 0, 0, pad)).transpose(1, 2) for x in (q, k, v))
    g, beta = (F.pad(x.float(), (0, 0, 0, pad)).transpose(1, 2) for x in (g, beta))
    q, k, v = (x.reshape(B, H, -1, L, x.shape[-1]) for x in (q, k, v))
    g, beta = (x.reshape(B, H, -1, L) for x in (g, beta))
    q = q * scale
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    eye, eye_k = torch.eye(L, device=q.device), torch.eye(K, device=q.device)
    state = zero_state(B, H, K, V, q.device) if initial_state is None else initial_state.float()
    outs = []
    # The WY pieces of a block of chunks at a time (as many as keep their (L, L) pieces in cache), and all
    # else that does not need the chunk-start state S_c, batched; the loop over chunks then only carries the
    # state, one baddbmm each, S_{c+1} = (exp(gamma_L) I - K_dec^T W) S_c + K_dec^T U with
    # K_dec = diag(exp(gamma_L - gamma)) K, and V_new and O follow for all the block's chunks at once.
    block = max(1, BLOCK_ELEMENTS // (B * H * L * L))
    state = state.flatten(0, 1)  # (B * H, K, V)
    for b0 in range(0, q.shape[2], block):
        qb, kb, vb, gb, betab = (x[:, :, b0:b0 + block] for x in (q, k, v, g, beta))
        gamma = gb.cumsum(-1)  # (B, H, nb, L)
        decay = torch.where(causal, gamma[..., :, None] - gamma[..., None, :], -torch.inf).exp()  # Gamma
        # WY representation of the block's chunks; the triangular solve is exact forward substitution.
        m = (betab[..., None] * (kb @ kb.transpose(-1, -2)) * decay).tril(-1)  # (B, H, nb, L, L)
        t_inv = torch.linalg.solve_triangular(eye + m, eye.expand_as(m), upper=False, unitriangular=True)
        w = t_inv @ (kb * (betab * gamma.exp())[..., None])  # (B, H, nb, L, K)
        u = t_inv @ (vb * betab[..., None])  # (B, H, nb, L, V)
        k_dec = (kb * (gamma[..., -1:] - gamma).exp()[..., None]).transpose(-1, -2)  # (B, H, nb, K, L)
        carry = gamma[..., -1, None, None].exp() * eye_k - k_dec @ w  # (B, H, nb, K, K)
        writes = k_dec @ u  # (B, H, nb, K, V)
        starts = []
        for carry_c, writes_c in zip(carry.flatten(0, 1).unbind(1), writes.flatten(0, 1).unbind(1)):
            starts.append(state)
            state = torch.baddbmm(writes_c, carry_c, state)
        s_c = torch.stack(starts, dim=1).unflatten(0, (B, H))  # (B, H, nb, K, V)
        attn = (qb @ kb.transpose(-1, -2)) * decay  # (B, H, nb, L, L), zero above the diagonal
        outs.append((qb * gamma.exp()[..., None]) @ s_c + attn @ (u - w @ s_c))  # (B, H, nb, L, V)
    o = torch.cat(outs, dim=2).reshape(B, H, -1, V)[:, :, :T].transpose(1, 2)
    return o.to(dtype), state.unflatten(0, (B, H))
