"""Chunkwise gated delta rule in Triton, forward and backward, in the WY form of `reference.delta_rule_chunk`.

Layout is flash-linear-attention's: q, k (B, T, H, K), v (B, T, H, V), g and beta (B, T, H), state
(B, H, K, V) fp32. The launcher pads T to a multiple of the chunk L (padded tokens have k = v = 0,
beta = 0, g = 0: no effect), so the kernels need no time masks; K and V need not be powers of two
(masked loads, KF = K rounded up to a power of two).

Per chunk every kernel rebuilds the chunk's small (L, L) pieces from q, k, g, beta: the decay matrix
Gamma, M = tril(diag(beta) K K^T * Gamma, -1) and T = (I + M)^-1 by forward substitution (exact; a
Neumann product would square M's entries and lose digits), W = T diag(beta exp(gamma)) K.

Kernels (a "state tile" is (KF, BV) fp32 in registers: the update W S needs all of K):
  1. `_gdr_fwd_kernel`, grid (V blocks, B*H): walks the chunks in order; writes o and the final state,
     or, when recomputing for the backward, the state at every chunk boundary. States are recomputed
     rather than kept, as in kernels/gla: they would be the largest activation of the model.
  2. `_gdr_bwd_dstates_kernel`, grid (V blocks, B*H): walks the chunks backwards, writing d loss / d S at
     every boundary (the first is the initial-state gradient):
         dV_new = (Q K^T * Gamma)^T dO + diag(exp(gamma_L - gamma)) K dS_{c+1}
         dS_c   = exp(gamma_L) dS_{c+1} + (diag(exp(gamma)) Q)^T dO - W^T dV_new
  3. `_gdr_bwd_chunk_kernel`, grid (NC, B*H): every other gradient of one chunk (dq, dk, dv, dbeta and
     d gamma, the gradient of the cumulative log decay) by the chain rule through the WY form; V is
     walked in blocks. d g is the reverse cumulative sum of d gamma inside each chunk (PyTorch, O(T)).

Matmuls and all accumulation are fp32 ("ieee" dots for fp32 inputs, tf32 otherwise; the triangular
inverse always "ieee"). Under TRITON_INTERPRET=1 the same code runs on the CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import triton_launch as launch
from kernels.delta_rule.dispatch import TRITON_CHUNK_SIZES, TRITON_MAX_KEY_DIM
from kernels.delta_rule.reference import check_inputs

# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _unit_lower_inverse(m, L: tl.constexpr):
    """(I + m)^-1 for a strictly lower triangular (L, L) m, by forward substitution: row i of the
    inverse is e_i - sum_{j<i} m[i, j] * row j (rows j < i are final when row i is formed)."""
    rows = tl.arange(0, L)
    t_inv = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)
    for i in range(1, L):
        m_i = tl.sum(tl.where(rows[:, None] == i, m, 0.0), axis=0)  # row i of m, (L,) over j
        row = tl.sum(m_i[:, None] * t_inv, axis=0)  # sum_j m[i, j] * t_inv[j, :]
        t_inv = tl.where(rows[:, None] == i, t_inv - row[None, :], t_inv)
    return t_inv


@triton.jit
def _chunk_wy(q_ptr, k_ptr, g_ptr, beta_ptr, tok, offs_kf, mask_kf, scale, K: tl.constexpr, L: tl.constexpr,
              PREC: tl.constexpr):
    """The chunk's q, k (L, KF), beta, gamma (L,), gamma_L, Gamma (L, L), M, T^-1, W, and the scaled
    causal attention P = (Q K^T * Gamma) * scale (zero above the diagonal)."""
    rows = tl.arange(0, L)
    causal = rows[:, None] >= rows[None, :]
    q = tl.load(q_ptr + tok[:, None] * K + offs_kf[None, :], mask=mask_kf[None, :], other=0.0).to(tl.float32)
    k = tl.load(k_ptr + tok[:, None] * K + offs_kf[None, :], mask=mask_kf[None, :], other=0.0).to(tl.float32)
    g = tl.load(g_ptr + tok).to(tl.float32)
    beta = tl.load(beta_ptr + tok).to(tl.float32)
    gamma = tl.cumsum(g, axis=0)
    gamma_last = tl.sum(g, axis=0)
    decay = tl.exp(tl.where(causal, gamma[:, None] - gamma[None, :], float("-inf")))  # (L, L)
    kk = tl.dot(k, tl.trans(k), input_precision="ieee")
    m = tl.where(rows[:, None] > rows[None, :], beta[:, None] * kk * decay, 0.0)
    t_inv = _unit_lower_inverse(m, L)
    k_t = k * (beta * tl.exp(gamma))[:, None]  # diag(beta exp(gamma)) K
    w = tl.dot(t_inv, k_t, input_precision="ieee")  # (L, KF)
    p = tl.dot(q, tl.trans(k), input_precision=PREC) * decay * scale
    return q, k, beta, gamma, gamma_last, decay, kk, m, t_inv, k_t, w, p


@triton.jit
def _gdr_fwd_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, h0_ptr,
    o_ptr, ht_ptr, hs_ptr,  # o like v; final state (BH, K, V); boundary states (BH, NC+1, K, V)
    T, H, scale,
    K: tl.constexpr, V: tl.constexpr, L: tl.constexpr, KF: tl.constexpr, BV: tl.constexpr,
    RECOMPUTE: tl.constexpr, PREC: tl.constexpr,
):
    pid_v, bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    b_idx, h = bh // H, bh % H
    NC = T // L
    rows = tl.arange(0, L)
    offs_kf = tl.arange(0, KF)
    mask_kf = offs_kf < K
    offs_v = pid_v * BV + tl.arange(0, BV)
    mask_v = offs_v < V
    offs_kv = offs_kf[:, None] * V + offs_v[None, :]
    mask_kv = mask_kf[:, None] & mask_v[None, :]

    S = tl.load(h0_ptr + bh * K * V + offs_kv, mask=mask_kv, other=0.0)  # (KF, BV)
    for c in range(NC):
        if RECOMPUTE:
            tl.store(hs_ptr + (bh * (NC + 1) + c) * K * V + offs_kv, S, mask=mask_kv)
        tok = (b_idx * T + c * L + rows) * H + h  # (L,) token index into (B*T*H)
        q, k, beta, gamma, gamma_last, decay, kk, m, t_inv, k_t, w, p = _chunk_wy(
            q_ptr, k_ptr, g_ptr, beta_ptr, tok, offs_kf, mask_kf, scale, K, L, PREC)
        v = tl.load(v_ptr + tok[:, None] * V + offs_v[None, :], mask=mask_v[None, :], other=0.0).to(tl.float32)
        u = tl.dot(t_inv, v * beta[:, None], input_precision="ieee")  # (L, BV)
        v_new = u - tl.dot(w, S, input_precision=PREC)
        if not RECOMPUTE:
            o = tl.dot(q * (tl.exp(gamma) * scale)[:, None], S, input_precision=PREC)
            o += tl.dot(p, v_new, input_precision=PREC)
            tl.store(o_ptr + tok[:, None] * V + offs_v[None, :], o.to(o_ptr.dtype.element_ty),
                     mask=mask_v[None, :])
        k_dec = k * tl.exp(gamma_last - gamma)[:, None]
        S = tl.exp(gamma_last) * S + tl.dot(tl.trans(k_dec), v_new, input_precision=PREC)
    if RECOMPUTE:
        tl.store(hs_ptr + (bh * (NC + 1) + NC) * K * V + offs_kv, S, mask=mask_kv)
    else:
        tl.store(ht_ptr + bh * K * V + offs_kv, S, mask=mask_kv)


@triton.jit
def _gdr_bwd_dstates_kernel(
    q_ptr, k_ptr, g_ptr, beta_ptr, do_ptr, dht_ptr,
    dhs_ptr,  # d loss / d S at chunk boundaries (BH, NC+1, K, V)
    T, H, scale,
    K: tl.constexpr, V: tl.constexpr, L: tl.constexpr, KF: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_v, bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    b_idx, h = bh // H, bh % H
    NC = T // L
    rows = tl.arange(0, L)
    offs_kf = tl.arange(0, KF)
    mask_kf = offs_kf < K
    offs_v = pid_v * BV + tl.arange(0, BV)
    mask_v = offs_v < V
    offs_kv = offs_kf[:, None] * V + offs_v[None, :]
    mask_kv = mask_kf[:, None] & mask_v[None, :]

    dS = tl.load(dht_ptr + bh * K * V + offs_kv, mask=mask_kv, other=0.0)  # (KF, BV)
    for cc in range(NC):
        c = NC - 1 - cc
        tl.store(dhs_ptr + (bh * (NC + 1) + c + 1) * K * V + offs_kv, dS, mask=mask_kv)
        tok = (b_idx * T + c * L + rows) * H + h
        q, k, beta, gamma, gamma_last, decay, kk, m, t_inv, k_t, w, p = _chunk_wy(
            q_ptr, k_ptr, g_ptr, beta_ptr, tok, offs_kf, mask_kf, scale, K, L, PREC)
        do = tl.load(do_ptr + tok[:, None] * V + offs_v[None, :], mask=mask_v[None, :], other=0.0).to(tl.float32)
        k_dec = k * tl.exp(gamma_last - gamma)[:, None]
        dv_new = tl.dot(tl.trans(p), do, input_precision=PREC) + tl.dot(k_dec, dS, input_precision=PREC)
        q_dec = q * (tl.exp(gamma) * scale)[:, None]
        dS = (tl.exp(gamma_last) * dS + tl.dot(tl.trans(q_dec), do, input_precision=PREC)
              - tl.dot(tl.trans(w), dv_new, input_precision=PREC))
    tl.store(dhs_ptr + (bh * (NC + 1)) * K * V + offs_kv, dS, mask=mask_kv)


@triton.jit
def _gdr_bwd_chunk_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, do_ptr, hs_ptr, dhs_ptr,
    dq_ptr, dk_ptr, dv_ptr, dbeta_ptr, dgamma_ptr,  # dq, dk, dv like q, k, v; dbeta, dgamma (B, T, H) fp32
    T, H, scale,
    K: tl.constexpr, V: tl.constexpr, L: tl.constexpr, KF: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr,
):
    c, bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    b_idx, h = bh // H, bh % H
    NC = T // L
    rows = tl.arange(0, L)
    causal = rows[:, None] >= rows[None, :]
    strict = rows[:, None] > rows[None, :]
    offs_kf = tl.arange(0, KF)
    mask_kf = offs_kf < K
    tok = (b_idx * T + c * L + rows) * H + h
    s_c = (bh * (NC + 1) + c) * K * V  # offset of S_c; dS_{c+1} is at s_c + K * V in dhs
    q, k, beta, gamma, gamma_last, decay, kk, m, t_inv, k_t, w, p = _chunk_wy(
        q_ptr, k_ptr, g_ptr, beta_ptr, tok, offs_kf, mask_kf, scale, K, L, PREC)
    k_dec = k * tl.exp(gamma_last - gamma)[:, None]
    q_dec = q * (tl.exp(gamma) * scale)[:, None]

    dp = tl.zeros([L, L], dtype=tl.float32)  # d loss / d P
    dt = tl.zeros([L, L], dtype=tl.float32)  # d loss / d T^-1
    do_S = tl.zeros([L, KF], dtype=tl.float32)  # dO S_c^T
    vn_dS = tl.zeros([L, KF], dtype=tl.float32)  # V_new dS_{c+1}^T
    dw = tl.zeros([L, KF], dtype=tl.float32)
    dbeta = tl.zeros([L], dtype=tl.float32)
    dgamma_last = tl.sum(tl.zeros([L], dtype=tl.float32), axis=0)
    for vb in range(0, V, BV):
        offs_v = vb + tl.arange(0, BV)
        mask_v = offs_v < V
        offs_kv = offs_kf[:, None] * V + offs_v[None, :]
        mask_kv = mask_kf[:, None] & mask_v[None, :]
        S = tl.load(hs_ptr + s_c + offs_kv, mask=mask_kv, other=0.0)  # (KF, BV)
        dS = tl.load(dhs_ptr + s_c + K * V + offs_kv, mask=mask_kv, other=0.0)
        v = tl.load(v_ptr + tok[:, None] * V + offs_v[None, :], mask=mask_v[None, :], other=0.0).to(tl.float32)
        do = tl.load(do_ptr + tok[:, None] * V + offs_v[None, :], mask=mask_v[None, :], other=0.0).to(tl.float32)
        v_b = v * beta[:, None]
        v_new = tl.dot(t_inv, v_b, input_precision="ieee") - tl.dot(w, S, input_precision=PREC)
        dv_new = tl.dot(tl.trans(p), do, input_precision=PREC) + tl.dot(k_dec, dS, input_precision=PREC)
        dp += tl.dot(do, tl.trans(v_new), input_precision=PREC)
        do_S += tl.dot(do, tl.trans(S), input_precision=PREC)
        vn_dS += tl.dot(v_new, tl.trans(dS), input_precision=PREC)
        dw -= tl.dot(dv_new, tl.trans(S), input_precision=PREC)
        dt += tl.dot(dv_new, tl.trans(v_b), input_precision="ieee")
        dv_b = tl.dot(tl.trans(t_inv), dv_new, input_precision="ieee")  # d loss / d (diag(beta) V)
        tl.store(dv_ptr + tok[:, None] * V + offs_v[None, :], (dv_b * beta[:, None]).to(dv_ptr.dtype.element_ty),
                 mask=mask_v[None, :] & (rows[:, None] >= 0))
        dbeta += tl.sum(dv_b * v, axis=1)
        dgamma_last += tl.sum(dS * S) * tl.exp(gamma_last)

    dt += tl.dot(dw, tl.trans(k_t), input_precision="ieee")
    dk_t = tl.dot(tl.trans(t_inv), dw, input_precision="ieee")  # d loss / d (diag(beta exp(gamma)) K)
    dm = -tl.dot(tl.dot(tl.trans(t_inv), dt, input_precision="ieee"), tl.trans(t_inv), input_precision="ieee")
    dm = tl.where(strict, dm, 0.0)  # only the strictly lower part of M is a function of the inputs
    dp = tl.where(causal, dp, 0.0)
    dp_decay = dp * decay * scale  # d loss / d (Q K^T) through P
    dm_decay = dm * decay * beta[:, None]  # d loss / d (K K^T) through M

    dq = tl.exp(gamma)[:, None] * do_S * scale + tl.dot(dp_decay, k, input_precision=PREC)
    dk = (tl.dot(tl.trans(dp_decay), q, input_precision=PREC) + tl.exp(gamma_last - gamma)[:, None] * vn_dS
          + tl.dot(dm_decay, k, input_precision="ieee") + tl.dot(tl.trans(dm_decay), k, input_precision="ieee")
          + (beta * tl.exp(gamma))[:, None] * dk_t)
    dbeta += tl.sum(dm * kk * decay, axis=1) + tl.exp(gamma) * tl.sum(k * dk_t, axis=1)
    # d gamma: every exp(gamma_t - gamma_s) weight gives +x to row t and -x to column s.
    x = dm * m + dp * p
    k_dec_dS = tl.sum(k_dec * vn_dS, axis=1)
    dgamma = (tl.sum(x, axis=1) - tl.sum(x, axis=0) + tl.sum(k_t * dk_t, axis=1) + tl.sum(q_dec * do_S, axis=1)
              - k_dec_dS)
    dgamma_last += tl.sum(k_dec_dS, axis=0)
    dgamma += tl.where(rows == L - 1, dgamma_last, 0.0)

    mask_tk = mask_kf[None, :] & (rows[:, None] >= 0)
    tl.store(dq_ptr + tok[:, None] * K + offs_kf[None, :], dq.to(dq_ptr.dtype.element_ty), mask=mask_tk)
    tl.store(dk_ptr + tok[:, None] * K + offs_kf[None, :], dk.to(dk_ptr.dtype.element_ty), mask=mask_tk)
    tl.store(dbeta_ptr + tok, dbeta)
    tl.store(dgamma_ptr + tok, dgamma)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------


# Two pipeline stages, not Triton's default three: at K = V = 256 in fp32 the third stage's operand
# buffers take the backward chunk kernel to 224 KiB of shared memory, past an A100's 163 KiB
# (found by kernels/aot.py); two stages need 156 KiB.
BWD_CHUNK_STAGES = 2


def _tiles(K: int, V: int) -> tuple[int, int, int]:
    """(KF, BV, num_warps): all of K in one tile (W S and the decay need it), V in blocks of 32."""
    kf = max(triton.next_power_of_2(K), 16)
    return kf, min(max(triton.next_power_of_2(V), 16), 32), 4 if kf <= 64 else 8


def _fwd(q, k, v, g, beta, h0, scale, chunk_size, recompute):
    """Inputs contiguous with T a multiple of chunk_size. Returns (o, final state), or the NC + 1
    boundary states (BH, NC+1, K, V) when recomputing for the backward."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    NC = T // chunk_size
    KF, BV, warps = _tiles(K, V)
    if recompute:
        o = ht = q  # unused pointers
        hs = launch.alloc(B * H, NC + 1, K, V, dtype=torch.float32, device=q.device)
    else:
        o = launch.alloc(B, T, H, V, dtype=v.dtype, device=q.device)
        ht = launch.alloc(B, H, K, V, dtype=torch.float32, device=q.device)
        hs = ht  # unused pointer
    _gdr_fwd_kernel[(triton.cdiv(V, BV), B * H)](
        q, k, v, g, beta, h0, o, ht, hs, T, H, scale,
        K=K, V=V, L=chunk_size, KF=KF, BV=BV, RECOMPUTE=recompute, PREC=launch.dot_precision(q.dtype),
        num_warps=warps,
    )
    return hs if recompute else (o, ht)


def _bwd(q, k, v, g, beta, h0, do, dht, scale, chunk_size):
    """Gradients of q, k, v, g, beta and the initial state; inputs contiguous, T a multiple of L."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    NC = T // chunk_size
    KF, BV, warps = _tiles(K, V)
    prec = launch.dot_precision(q.dtype)
    hs = _fwd(q, k, v, g, beta, h0, scale, chunk_size, recompute=True)
    dhs = launch.alloc(B * H, NC + 1, K, V, dtype=torch.float32, device=q.device)
    dq = launch.alloc(*q.shape, dtype=q.dtype, device=q.device)
    dk = launch.alloc(*k.shape, dtype=k.dtype, device=q.device)
    dv = launch.alloc(*v.shape, dtype=v.dtype, device=q.device)
    dbeta = launch.alloc(*g.shape, dtype=torch.float32, device=q.device)
    dgamma = launch.alloc(*g.shape, dtype=torch.float32, device=q.device)
    _gdr_bwd_dstates_kernel[(triton.cdiv(V, BV), B * H)](
        q, k, g, beta, do, dht, dhs, T, H, scale, K=K, V=V, L=chunk_size, KF=KF, BV=BV, PREC=prec,
        num_warps=warps,
    )
    _gdr_bwd_chunk_kernel[(NC, B * H)](
        q, k, v, g, beta, do, hs, dhs, dq, dk, dv, dbeta, dgamma, T, H, scale,
        K=K, V=V, L=chunk_size, KF=KF, BV=BV, PREC=prec, num_warps=warps, num_stages=BWD_CHUNK_STAGES,
    )
    # gamma_t = sum of g over the chunk up to t: d g_t = sum of d gamma over t' >= t in the same chunk.
    dgamma = dgamma.view(B, NC, chunk_size, H)
    dg = dgamma.flip(2).cumsum(2).flip(2).view(B, T, H)
    return dq, dk, dv, dg.to(g.dtype), dbeta.to(beta.dtype), dhs[:, 0].view(B, H, K, V).clone()


# ----------------------------------------------------------------------------------------------------
# autograd.Function and the public function
# ----------------------------------------------------------------------------------------------------


class _ChunkGatedDeltaRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, scale, chunk_size):
        with launch.on_device(q):
            o, ht = _fwd(q, k, v, g, beta, h0, scale, chunk_size, recompute=False)
        ctx.save_for_backward(q, k, v, g, beta, h0)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, h0 = ctx.saved_tensors
        do = torch.zeros_like(v) if do is None else do.to(v.dtype).contiguous()
        dht = torch.zeros_like(h0) if dht is None else dht.float().contiguous()
        with launch.on_device(q):
            grads = _bwd(q, k, v, g, beta, h0, do, dht, ctx.scale, ctx.chunk_size)
        return (*grads, None, None)


def chunk_gated_delta_rule_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise gated delta rule with Triton kernels, differentiable in all inputs and the initial state.

    q, k: (B, T, H, K); v: (B, T, H, V) (one dtype: fp32, bf16 or fp16); g (log decay, <= 0) and beta:
    (B, T, H); initial_state: (B, H, K, V) or None; scale defaults to K ** -0.5. Keys should be
    L2-normalised (the recurrence is only contractive then). Returns o (B, T, H, V) in v's dtype and
    the final state (B, H, K, V) fp32.

    Example (CUDA, or CPU with TRITON_INTERPRET=1):
        >>> q, k = F.normalize(torch.randn(2, 2, 100, 2, 64, device="cuda"), dim=-1).unbind(0)
        >>> g, beta = F.logsigmoid(torch.randn(100, device="cuda")).expand(2, 100, 2), torch.rand(2, 100, 2)
        >>> o, state = chunk_gated_delta_rule_triton(q, k, torch.randn(2, 100, 2, 48, device="cuda"), g, beta)
    """
    check_inputs(q, k, v, g, beta, initial_state)
    launch.check_half_or_fp32(q, k, v)
    launch.check_chunk(chunk_size, TRITON_CHUNK_SIZES)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if K > TRITON_MAX_KEY_DIM:
        raise ValueError(f"the Triton gated delta rule kernel takes key dims up to {TRITON_MAX_KEY_DIM}, got {K}")
    scale = K**-0.5 if scale is None else scale
    q, k, v, g, beta = launch.pad_time(chunk_size, q, k, v, g.float(), beta.float())
    h0 = launch.initial_state(initial_state, (B, H, K, V), q.device)
    o, ht = _ChunkGatedDeltaRule.apply(q, k, v, g, beta, h0, scale, chunk_size)
    return o[:, :T], ht


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (used by the AOT compile test for sm_80 / sm_90)
# ----------------------------------------------------------------------------------------------------


def _aot_specs() -> list[dict]:
    """One entry per (kernel, dtype, chunk size) at MoM's head sizes (K = V = 256), in each chunk size it takes."""
    in_dtype = {"q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr"}
    K = V = 256
    KF, BV, warps = _tiles(K, V)
    specs = []
    for L in TRITON_CHUNK_SIZES:
        for dtype, torch_dtype in launch.DTYPES:
            base = {"K": K, "V": V, "L": L, "KF": KF, "BV": BV, "PREC": launch.dot_precision(torch_dtype)}
            for fn, consts in (
                (_gdr_fwd_kernel, {**base, "RECOMPUTE": False}),
                (_gdr_fwd_kernel, {**base, "RECOMPUTE": True}),
                (_gdr_bwd_dstates_kernel, base),
                (_gdr_bwd_chunk_kernel, base),
            ):
                stages = BWD_CHUNK_STAGES if fn is _gdr_bwd_chunk_kernel else None
                specs.append(launch.aot_spec(fn, consts, dtype, in_dtype, warps, num_stages=stages))
    return specs


AOT_KERNELS: list[dict] = _aot_specs()
