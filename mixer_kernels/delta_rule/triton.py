"""Chunkwise gated delta rule in Triton, forward and backward, in the WY form of `reference.delta_rule_chunk`.

Layout is flash-linear-attention's: q, k (B, T, H, K), v (B, T, H, V), g and beta (B, T, H), state
(B, H, K, V) fp32. The launcher pads T to a multiple of the chunk L (padded tokens have k = v = 0,
beta = 0, g = 0: no effect), so the kernels need no time masks; K and V need not be powers of two
(masked loads, KF = K rounded up to a power of two).

Per chunk, `_gdr_wy_kernel` (grid (NC, B*H), chunk-parallel) builds the WY pieces once: the decay matrix
Gamma, M = tril(diag(beta) K K^T * Gamma, -1), T^-1 = (I + M)^-1 by forward substitution (exact; a
Neumann product would square M's entries and lose digits), W = T^-1 diag(beta exp(gamma)) K and the
scaled causal attention P = (Q K^T * Gamma) * scale. It walks K in blocks of BK and writes W (like k,
fp32), T^-1 and P ((L, L) per chunk, fp32); the backward recomputes them rather than keeping them.

The state walks hold a (KF, BV) fp32 state tile in registers (W S needs all of K) and one (L, KF) tile
at a time; the chunk-parallel kernels walk K in blocks, so no kernel spills at K = 256 (the spill
budget of tests/kernels/test_aot.py):
  1. `_gdr_fwd_kernel`, grid (V blocks, B*H): walks the chunks in order; writes o and the final state,
     or, when recomputing for the backward, the state at every chunk boundary. States are recomputed
     rather than kept, as in mixer_kernels/gla: they would be the largest activation of the model.
  2. `_gdr_bwd_dstates_kernel`, grid (V blocks, B*H): walks the chunks backwards, writing d loss / d S at
     every boundary (the first is the initial-state gradient):
         dV_new = P^T dO + diag(exp(gamma_L - gamma)) K dS_{c+1}
         dS_c   = exp(gamma_L) dS_{c+1} + (diag(exp(gamma)) Q)^T dO - W^T dV_new
  3. `_gdr_bwd_values_kernel`, grid (NC, B*H): walks V in blocks for dv and everything the key side
     needs summed over V: d P, d T^-1 (L, L), dO S^T, V_new dS^T, d W (L, K), their parts of d beta and
     d gamma_L (written to fp32 buffers).
  4. `_gdr_bwd_keys_kernel`, grid (NC, B*H): dq, dk, d beta and d gamma (the gradient of the cumulative
     log decay) by the chain rule through the WY form, walking K in blocks. d g is the reverse cumulative
     sum of d gamma inside each chunk (PyTorch, O(T)).

Matmuls and all accumulation are fp32 ("ieee" dots for fp32 inputs, tf32 otherwise: TF32 adds at most
3e-3 rel-RMS at real head sizes, a third of what bf16 operands would, tests/kernels/test_tf32.py; the
triangular inverse always "ieee"). Under TRITON_INTERPRET=1 the same code runs on the CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixer_kernels import triton_launch as launch
from mixer_kernels.delta_rule.dispatch import TRITON_CHUNK_SIZES, TRITON_MAX_KEY_DIM
from mixer_kernels.delta_rule.reference import check_inputs
from mixer_kernels.varlen import packed_call

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
def _chunk_gates(g_ptr, beta_ptr, tok, L: tl.constexpr):
    """beta, the cumulative log decay gamma (L,), its total gamma_L and the decay Gamma (L, L), zero
    above the diagonal (masked before exp: gamma_t - gamma_s > 0 there and could overflow)."""
    rows = tl.arange(0, L)
    g = tl.load(g_ptr + tok).to(tl.float32)
    beta = tl.load(beta_ptr + tok).to(tl.float32)
    gamma = tl.cumsum(g, axis=0)
    gamma_last = tl.sum(g, axis=0)
    decay = tl.exp(tl.where(rows[:, None] >= rows[None, :], gamma[:, None] - gamma[None, :], float("-inf")))
    return beta, gamma, gamma_last, decay


@triton.jit
def _load_rows(ptr, tok, offs, width: tl.constexpr):
    """Rows `tok` of a (tokens, width) buffer at columns `offs` (masked past width), as fp32."""
    return tl.load(ptr + tok[:, None] * width + offs[None, :], mask=offs[None, :] < width, other=0.0).to(tl.float32)


@triton.jit
def _store_rows(ptr, tok, offs, width: tl.constexpr, x):
    tl.store(ptr + tok[:, None] * width + offs[None, :], x.to(ptr.dtype.element_ty),
             mask=(offs[None, :] < width) & (tok[:, None] >= 0))


@triton.jit
def _gdr_wy_kernel(
    q_ptr, k_ptr, g_ptr, beta_ptr,
    w_ptr, tinv_ptr, p_ptr,  # W (B*T*H, K) fp32; T^-1 and P (BH, NC, L, L) fp32
    T, H, scale,
    K: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    c, bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    b_idx, h = bh // H, bh % H
    rows = tl.arange(0, L)
    tok = (b_idx * T + c * L + rows) * H + h  # (L,) token index into (B*T*H)
    beta, gamma, gamma_last, decay = _chunk_gates(g_ptr, beta_ptr, tok, L)
    kk = tl.zeros([L, L], dtype=tl.float32)
    qk = tl.zeros([L, L], dtype=tl.float32)
    for kb in range(0, K, BK):
        offs_k = kb + tl.arange(0, BK)
        k = _load_rows(k_ptr, tok, offs_k, K)
        kk += tl.dot(k, tl.trans(k), input_precision="ieee")
        qk += tl.dot(_load_rows(q_ptr, tok, offs_k, K), tl.trans(k), input_precision=PREC)
    m = tl.where(rows[:, None] > rows[None, :], beta[:, None] * kk * decay, 0.0)
    t_inv = _unit_lower_inverse(m, L)
    for kb in range(0, K, BK):
        offs_k = kb + tl.arange(0, BK)
        k_t = _load_rows(k_ptr, tok, offs_k, K) * (beta * tl.exp(gamma))[:, None]  # diag(beta exp(gamma)) K
        _store_rows(w_ptr, tok, offs_k, K, tl.dot(t_inv, k_t, input_precision="ieee"))
    ll = ((bh * (T // L) + c) * L + rows)[:, None] * L + rows[None, :]
    tl.store(tinv_ptr + ll, t_inv)
    tl.store(p_ptr + ll, qk * decay * scale)


@triton.jit
def _gdr_fwd_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, h0_ptr, w_ptr, tinv_ptr, p_ptr,
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
    offs_v = pid_v * BV + tl.arange(0, BV)
    offs_kv = offs_kf[:, None] * V + offs_v[None, :]
    mask_kv = (offs_kf[:, None] < K) & (offs_v[None, :] < V)

    S = tl.load(h0_ptr + bh * K * V + offs_kv, mask=mask_kv, other=0.0)  # (KF, BV)
    for c in range(NC):
        if RECOMPUTE:
            tl.store(hs_ptr + (bh * (NC + 1) + c) * K * V + offs_kv, S, mask=mask_kv)
        tok = (b_idx * T + c * L + rows) * H + h
        ll = ((bh * NC + c) * L + rows)[:, None] * L + rows[None, :]
        beta, gamma, gamma_last, _ = _chunk_gates(g_ptr, beta_ptr, tok, L)
        v = _load_rows(v_ptr, tok, offs_v, V)
        u = tl.dot(tl.load(tinv_ptr + ll), v * beta[:, None], input_precision="ieee")  # (L, BV)
        # One (L, KF) tile live at a time (q, then W, then K): two at once spilled at K = 256.
        if not RECOMPUTE:
            q = _load_rows(q_ptr, tok, offs_kf, K)
            o = tl.dot(q * (tl.exp(gamma) * scale)[:, None], S, input_precision=PREC)
        v_new = u - tl.dot(_load_rows(w_ptr, tok, offs_kf, K), S, input_precision=PREC)
        if not RECOMPUTE:
            o += tl.dot(tl.load(p_ptr + ll), v_new, input_precision=PREC)
            _store_rows(o_ptr, tok, offs_v, V, o)
        k_dec = _load_rows(k_ptr, tok, offs_kf, K) * tl.exp(gamma_last - gamma)[:, None]
        S = tl.exp(gamma_last) * S + tl.dot(tl.trans(k_dec), v_new, input_precision=PREC)
    if RECOMPUTE:
        tl.store(hs_ptr + (bh * (NC + 1) + NC) * K * V + offs_kv, S, mask=mask_kv)
    else:
        tl.store(ht_ptr + bh * K * V + offs_kv, S, mask=mask_kv)


@triton.jit
def _gdr_bwd_dstates_kernel(
    q_ptr, k_ptr, g_ptr, beta_ptr, do_ptr, dht_ptr, w_ptr, p_ptr,
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
    offs_v = pid_v * BV + tl.arange(0, BV)
    offs_kv = offs_kf[:, None] * V + offs_v[None, :]
    mask_kv = (offs_kf[:, None] < K) & (offs_v[None, :] < V)

    dS = tl.load(dht_ptr + bh * K * V + offs_kv, mask=mask_kv, other=0.0)  # (KF, BV)
    for cc in range(NC):
        c = NC - 1 - cc
        tl.store(dhs_ptr + (bh * (NC + 1) + c + 1) * K * V + offs_kv, dS, mask=mask_kv)
        tok = (b_idx * T + c * L + rows) * H + h
        ll = ((bh * NC + c) * L + rows)[:, None] * L + rows[None, :]
        beta, gamma, gamma_last, _ = _chunk_gates(g_ptr, beta_ptr, tok, L)
        do = _load_rows(do_ptr, tok, offs_v, V)
        k_dec = _load_rows(k_ptr, tok, offs_kf, K) * tl.exp(gamma_last - gamma)[:, None]
        dv_new = (tl.dot(tl.trans(tl.load(p_ptr + ll)), do, input_precision=PREC)
                  + tl.dot(k_dec, dS, input_precision=PREC))
        q_dec = _load_rows(q_ptr, tok, offs_kf, K) * (tl.exp(gamma) * scale)[:, None]
        dS = (tl.exp(gamma_last) * dS + tl.dot(tl.trans(q_dec), do, input_precision=PREC)
              - tl.dot(tl.trans(_load_rows(w_ptr, tok, offs_kf, K)), dv_new, input_precision=PREC))
    tl.store(dhs_ptr + (bh * (NC + 1)) * K * V + offs_kv, dS, mask=mask_kv)


@triton.jit
def _gdr_bwd_values_kernel(
    k_ptr, v_ptr, g_ptr, beta_ptr, do_ptr, hs_ptr, dhs_ptr, w_ptr, tinv_ptr, p_ptr,
    dv_ptr,  # like v
    dp_ptr, dt_ptr,  # d loss / d P and / d T^-1, (BH, NC, L, L) fp32
    dos_ptr, vnds_ptr, dw_ptr,  # dO S_c^T, V_new dS_{c+1}^T, d loss / d W: (B*T*H, K) fp32
    dbeta_ptr, dglast_ptr,  # the value side's part of d beta (B*T*H) and of d gamma_L (BH, NC), fp32
    T, H,
    K: tl.constexpr, V: tl.constexpr, L: tl.constexpr, KF: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr,
):
    c, bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    b_idx, h = bh // H, bh % H
    NC = T // L
    rows = tl.arange(0, L)
    offs_kf = tl.arange(0, KF)
    tok = (b_idx * T + c * L + rows) * H + h
    ll = ((bh * NC + c) * L + rows)[:, None] * L + rows[None, :]
    s_c = (bh * (NC + 1) + c) * K * V  # offset of S_c; dS_{c+1} is at s_c + K * V in dhs
    beta, gamma, gamma_last, _ = _chunk_gates(g_ptr, beta_ptr, tok, L)
    t_inv = tl.load(tinv_ptr + ll)
    p = tl.load(p_ptr + ll)
    w = _load_rows(w_ptr, tok, offs_kf, K)
    k_dec = _load_rows(k_ptr, tok, offs_kf, K) * tl.exp(gamma_last - gamma)[:, None]

    dp = tl.zeros([L, L], dtype=tl.float32)
    dt = tl.zeros([L, L], dtype=tl.float32)
    do_S = tl.zeros([L, KF], dtype=tl.float32)
    vn_dS = tl.zeros([L, KF], dtype=tl.float32)
    dw = tl.zeros([L, KF], dtype=tl.float32)
    dbeta = tl.zeros([L], dtype=tl.float32)
    dgamma_last = tl.sum(tl.zeros([L], dtype=tl.float32), axis=0)
    for vb in range(0, V, BV):
        offs_v = vb + tl.arange(0, BV)
        offs_kv = offs_kf[:, None] * V + offs_v[None, :]
        mask_kv = (offs_kf[:, None] < K) & (offs_v[None, :] < V)
        S = tl.load(hs_ptr + s_c + offs_kv, mask=mask_kv, other=0.0)  # (KF, BV)
        dS = tl.load(dhs_ptr + s_c + K * V + offs_kv, mask=mask_kv, other=0.0)
        v = _load_rows(v_ptr, tok, offs_v, V)
        do = _load_rows(do_ptr, tok, offs_v, V)
        v_b = v * beta[:, None]
        v_new = tl.dot(t_inv, v_b, input_precision="ieee") - tl.dot(w, S, input_precision=PREC)
        dv_new = tl.dot(tl.trans(p), do, input_precision=PREC) + tl.dot(k_dec, dS, input_precision=PREC)
        dp += tl.dot(do, tl.trans(v_new), input_precision=PREC)
        do_S += tl.dot(do, tl.trans(S), input_precision=PREC)
        vn_dS += tl.dot(v_new, tl.trans(dS), input_precision=PREC)
        dw -= tl.dot(dv_new, tl.trans(S), input_precision=PREC)
        dt += tl.dot(dv_new, tl.trans(v_b), input_precision="ieee")
        dv_b = tl.dot(tl.trans(t_inv), dv_new, input_precision="ieee")  # d loss / d (diag(beta) V)
        _store_rows(dv_ptr, tok, offs_v, V, dv_b * beta[:, None])
        dbeta += tl.sum(dv_b * v, axis=1)
        dgamma_last += tl.sum(dS * S) * tl.exp(gamma_last)

    tl.store(dp_ptr + ll, dp)
    tl.store(dt_ptr + ll, dt)
    _store_rows(dos_ptr, tok, offs_kf, K, do_S)
    _store_rows(vnds_ptr, tok, offs_kf, K, vn_dS)
    _store_rows(dw_ptr, tok, offs_kf, K, dw)
    tl.store(dbeta_ptr + tok, dbeta)
    tl.store(dglast_ptr + bh * NC + c, dgamma_last)


@triton.jit
def _gdr_bwd_keys_kernel(
    q_ptr, k_ptr, g_ptr, beta_ptr, tinv_ptr, p_ptr, dp_ptr, dt_ptr, dos_ptr, vnds_ptr, dw_ptr, dglast_ptr,
    dq_ptr, dk_ptr,  # like q, k
    dbeta_ptr, dgamma_ptr,  # (B*T*H) fp32: d beta holds the value side's part on entry
    T, H, scale,
    K: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    c, bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    b_idx, h = bh // H, bh % H
    rows = tl.arange(0, L)
    causal = rows[:, None] >= rows[None, :]
    strict = rows[:, None] > rows[None, :]
    tok = (b_idx * T + c * L + rows) * H + h
    ll = ((bh * (T // L) + c) * L + rows)[:, None] * L + rows[None, :]
    beta, gamma, gamma_last, decay = _chunk_gates(g_ptr, beta_ptr, tok, L)
    k_scale = beta * tl.exp(gamma)  # K_t = diag(beta exp(gamma)) K
    t_inv = tl.load(tinv_ptr + ll)
    p = tl.load(p_ptr + ll)
    dp = tl.where(causal, tl.load(dp_ptr + ll), 0.0)

    # Pass 1 over K: K K^T (for M) and the W = T^-1 K_t part of d T^-1.
    kk = tl.zeros([L, L], dtype=tl.float32)
    dt = tl.load(dt_ptr + ll)
    for kb in range(0, K, BK):
        offs_k = kb + tl.arange(0, BK)
        k = _load_rows(k_ptr, tok, offs_k, K)
        kk += tl.dot(k, tl.trans(k), input_precision="ieee")
        dt += tl.dot(_load_rows(dw_ptr, tok, offs_k, K), tl.trans(k * k_scale[:, None]), input_precision="ieee")
    m = tl.where(strict, beta[:, None] * kk * decay, 0.0)
    dm = -tl.dot(tl.dot(tl.trans(t_inv), dt, input_precision="ieee"), tl.trans(t_inv), input_precision="ieee")
    dm = tl.where(strict, dm, 0.0)  # only the strictly lower part of M is a function of the inputs
    dp_decay = dp * decay * scale  # d loss / d (Q K^T) through P
    dm_decay = dm * decay * beta[:, None]  # d loss / d (K K^T) through M
    dbeta = tl.load(dbeta_ptr + tok) + tl.sum(dm * kk * decay, axis=1)
    # d gamma: every exp(gamma_t - gamma_s) weight gives +x to row t and -x to column s.
    x = dm * m + dp * p
    dgamma = tl.sum(x, axis=1) - tl.sum(x, axis=0)
    dgamma_last = tl.load(dglast_ptr + bh * (T // L) + c)

    # Pass 2 over K: dq, dk and the per-token sums over K.
    for kb in range(0, K, BK):
        offs_k = kb + tl.arange(0, BK)
        q = _load_rows(q_ptr, tok, offs_k, K)
        k = _load_rows(k_ptr, tok, offs_k, K)
        do_S = _load_rows(dos_ptr, tok, offs_k, K)
        vn_dS = _load_rows(vnds_ptr, tok, offs_k, K)
        dk_t = tl.dot(tl.trans(t_inv), _load_rows(dw_ptr, tok, offs_k, K), input_precision="ieee")
        dq = tl.exp(gamma)[:, None] * do_S * scale + tl.dot(dp_decay, k, input_precision=PREC)
        dk = (tl.dot(tl.trans(dp_decay), q, input_precision=PREC) + tl.exp(gamma_last - gamma)[:, None] * vn_dS
              + tl.dot(dm_decay, k, input_precision="ieee") + tl.dot(tl.trans(dm_decay), k, input_precision="ieee")
              + k_scale[:, None] * dk_t)
        _store_rows(dq_ptr, tok, offs_k, K, dq)
        _store_rows(dk_ptr, tok, offs_k, K, dk)
        k_dk_t = tl.sum(k * dk_t, axis=1)
        k_dec_vn_dS = tl.sum(k * vn_dS, axis=1) * tl.exp(gamma_last - gamma)
        dbeta += tl.exp(gamma) * k_dk_t
        dgamma += k_scale * k_dk_t + tl.sum(q * do_S, axis=1) * tl.exp(gamma) * scale - k_dec_vn_dS
        dgamma_last += tl.sum(k_dec_vn_dS, axis=0)
    dgamma += tl.where(rows == L - 1, dgamma_last, 0.0)
    tl.store(dbeta_ptr + tok, dbeta)
    tl.store(dgamma_ptr + tok, dgamma)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------


# One pipeline stage for the state walk: prefetching the next chunk's (L, K) tiles is what spilled its
# registers at K = 256 (mixer_kernels/aot.py); the walk is bound by its dots, not its loads.
FWD_STAGES = 1


def _tiles(K: int, V: int) -> tuple[int, int, int, int]:
    """(KF, BK, BV, num_warps): the state tile (KF, BV) holds all of K (W S needs it) and V in blocks of 32,
    or of 16 above K = 64; the chunk-parallel kernels walk K in blocks of BK."""
    kf = max(triton.next_power_of_2(K), 16)
    bv = min(max(triton.next_power_of_2(V), 16), 32 if kf <= 64 else 16)
    return kf, min(kf, 64), bv, 4 if kf <= 64 else 8


def _wy(q, k, g, beta, scale, chunk_size):
    """W (B*T*H, K), T^-1 and P (BH, NC, L, L), all fp32, of every chunk (chunk-parallel)."""
    B, T, H, K = q.shape
    NC, L = T // chunk_size, chunk_size
    _, BK, _, warps = _tiles(K, K)
    w = launch.alloc(B, T, H, K, dtype=torch.float32, device=q.device)
    t_inv = launch.alloc(B * H, NC, L, L, dtype=torch.float32, device=q.device)
    p = launch.alloc(B * H, NC, L, L, dtype=torch.float32, device=q.device)
    _gdr_wy_kernel[(NC, B * H)](q, k, g, beta, w, t_inv, p, T, H, scale, K=K, L=L, BK=BK,
                                PREC=launch.dot_precision(q.dtype), num_warps=warps)
    return w, t_inv, p


def _fwd(q, k, v, g, beta, h0, wy, scale, chunk_size, recompute):
    """Inputs contiguous with T a multiple of chunk_size, wy = _wy(...). Returns (o, final state), or the
    NC + 1 boundary states (BH, NC+1, K, V) when recomputing for the backward."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    NC = T // chunk_size
    KF, _, BV, warps = _tiles(K, V)
    if recompute:
        o = ht = q  # unused pointers
        hs = launch.alloc(B * H, NC + 1, K, V, dtype=torch.float32, device=q.device)
    else:
        o = launch.alloc(B, T, H, V, dtype=v.dtype, device=q.device)
        ht = launch.alloc(B, H, K, V, dtype=torch.float32, device=q.device)
        hs = ht  # unused pointer
    _gdr_fwd_kernel[(triton.cdiv(V, BV), B * H)](
        q, k, v, g, beta, h0, *wy, o, ht, hs, T, H, scale,
        K=K, V=V, L=chunk_size, KF=KF, BV=BV, RECOMPUTE=recompute, PREC=launch.dot_precision(q.dtype),
        num_warps=warps, num_stages=FWD_STAGES,
    )
    return hs if recompute else (o, ht)


def _bwd(q, k, v, g, beta, h0, do, dht, scale, chunk_size):
    """Gradients of q, k, v, g, beta and the initial state; inputs contiguous, T a multiple of L."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    NC, L = T // chunk_size, chunk_size
    KF, BK, BV, warps = _tiles(K, V)
    prec = launch.dot_precision(q.dtype)
    w, t_inv, p = wy = _wy(q, k, g, beta, scale, chunk_size)
    hs = _fwd(q, k, v, g, beta, h0, wy, scale, chunk_size, recompute=True)
    dhs = launch.alloc(B * H, NC + 1, K, V, dtype=torch.float32, device=q.device)
    _gdr_bwd_dstates_kernel[(triton.cdiv(V, BV), B * H)](
        q, k, g, beta, do, dht, w, p, dhs, T, H, scale, K=K, V=V, L=L, KF=KF, BV=BV, PREC=prec, num_warps=warps,
    )
    dv = launch.alloc(*v.shape, dtype=v.dtype, device=q.device)
    dp, dt = (launch.alloc(B * H, NC, L, L, dtype=torch.float32, device=q.device) for _ in range(2))
    do_S, vn_dS, dw = (launch.alloc(B, T, H, K, dtype=torch.float32, device=q.device) for _ in range(3))
    dbeta = launch.alloc(*g.shape, dtype=torch.float32, device=q.device)
    dgamma_last = launch.alloc(B * H, NC, dtype=torch.float32, device=q.device)
    _gdr_bwd_values_kernel[(NC, B * H)](
        k, v, g, beta, do, hs, dhs, w, t_inv, p, dv, dp, dt, do_S, vn_dS, dw, dbeta, dgamma_last, T, H,
        K=K, V=V, L=L, KF=KF, BV=BV, PREC=prec, num_warps=warps,
    )
    dq = launch.alloc(*q.shape, dtype=q.dtype, device=q.device)
    dk = launch.alloc(*k.shape, dtype=k.dtype, device=q.device)
    dgamma = launch.alloc(*g.shape, dtype=torch.float32, device=q.device)
    _gdr_bwd_keys_kernel[(NC, B * H)](
        q, k, g, beta, t_inv, p, dp, dt, do_S, vn_dS, dw, dgamma_last, dq, dk, dbeta, dgamma, T, H, scale,
        K=K, L=L, BK=BK, PREC=prec, num_warps=warps,
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
            wy = _wy(q, k, g, beta, scale, chunk_size)
            o, ht = _fwd(q, k, v, g, beta, h0, wy, scale, chunk_size, recompute=False)
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
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise gated delta rule with Triton kernels, differentiable in all inputs and the initial state.
    With `cu_seqlens` (packed documents, B = 1 over the flattened tokens, as fla's) each document runs
    alone, in one launch per kernel (mixer_kernels/varlen.py; d g is chunk-local already), and no final state
    is returned.

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
    if cu_seqlens is not None:
        def run(_, *packed):  # packed: chunk-aligned already
            h0 = launch.initial_state(None, (1, H, K, V), q.device)
            return _ChunkGatedDeltaRule.apply(*launch.pad_time(chunk_size, *packed), h0, scale, chunk_size)[0]

        return packed_call(run, cu_seqlens, chunk_size, initial_state, q, k, v, g, beta.float())
    q, k, v, g, beta = launch.pad_time(chunk_size, q, k, v, g.float(), beta.float())
    h0 = launch.initial_state(initial_state, (B, H, K, V), q.device)
    o, ht = _ChunkGatedDeltaRule.apply(q, k, v, g, beta, h0, scale, chunk_size)
    return o[:, :T], ht


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (used by the AOT compile test for sm_80 / sm_90)
# ----------------------------------------------------------------------------------------------------


def aot_specs(k: int, v: int, chunk_size: int, dtype: str) -> list[dict]:
    """The kernels one call at these head sizes, chunk and dtype ('fp32', 'bf16', 'fp16') launches, as
    ahead-of-time compile entries (mixer_kernels/aot.py)."""
    in_dtype = {"q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr"}
    KF, BK, BV, warps = _tiles(k, v)
    _, _, _, wy_warps = _tiles(k, k)
    prec = launch.dot_precision(dict(launch.DTYPES)[dtype])
    state = {"K": k, "V": v, "L": chunk_size, "KF": KF, "BV": BV, "PREC": prec}
    blocked = {"K": k, "L": chunk_size, "BK": BK, "PREC": prec}
    return [launch.aot_spec(fn, consts, dtype, in_dtype, n_warps, **extra) for fn, consts, n_warps, extra in (
        (_gdr_wy_kernel, blocked, wy_warps, {}),
        (_gdr_fwd_kernel, {**state, "RECOMPUTE": False}, warps, {"num_stages": FWD_STAGES}),
        (_gdr_fwd_kernel, {**state, "RECOMPUTE": True}, warps, {"num_stages": FWD_STAGES}),
        (_gdr_bwd_dstates_kernel, state, warps, {}),
        (_gdr_bwd_values_kernel, state, warps, {}),
        (_gdr_bwd_keys_kernel, blocked, warps, {}),
    )]


# MoM's head sizes (K = V = 256), every dtype and chunk size the dispatcher takes; bench/kernel_resources.py
# adds every shipped config's shape.
AOT_KERNELS: list[dict] = [spec for chunk in TRITON_CHUNK_SIZES for dtype, _ in launch.DTYPES
                           for spec in aot_specs(256, 256, chunk, dtype)]
