"""Chunkwise mLSTM forward and backward in Triton, with the same math as `reference.mlstm_chunkwise`.

Layout: q, k (B, NH, T, DQK), v (B, NH, T, DV), gates (B, NH, T), state (C, n, m) in fp32. The
sequence is cut into chunks of L = chunk_size tokens (a power of two >= 16); a ragged last chunk is
masked (its padded tokens get log forget 0 and input gate -inf, so they change nothing). DQK and DV
need not be powers of two: they are tiled in blocks of BK / BV with masks.

Forward (two kernels):
  1. `_mlstm_fw_states_kernel`, grid (DQK blocks, DV blocks, B*NH): walks the chunks in order and
     writes the state (C, n, m) at every chunk boundary, NC + 1 of them (the last is the final state).
  2. `_mlstm_fw_h_kernel`, grid (DV blocks, NC, B*NH): each chunk's outputs from its start state plus
     the causal intra-chunk part; also writes the per-token stabiliser m and the unnormalised q.n
     (called z) that the backward needs.
Backward (three kernels). States between chunks are RECOMPUTED in the backward with kernel 1 rather
than kept from the forward: (NC + 1) * DQK * DV fp32 per head would be the largest activation of
the model, while recomputing costs one extra pass of kernel 1.
  3. `_mlstm_bw_prep_kernel`, grid (NC, B*NH): dz = d loss / d z per token (needs dh . h over DV).
  4. `_mlstm_bw_dstates_kernel`, grid (DQK blocks, DV blocks, B*NH): walks the chunks backwards and
     writes d loss / d(C, n) at every chunk boundary; the first one is the initial-state gradient.
  5. `_mlstm_bw_dqkv_kernel`, grid (NC, B*NH): dq, dk, dv of a chunk, and per token k.dk (= di) and
     q.dq - k.dk, whose reverse cumulative sum over the sequence is d loss / d logsigmoid(f).
The last two O(T) gate steps (reverse cumsum, times sigmoid(-f)) and d m0 = <dC0, C0> + <dn0, n0>
are done in PyTorch in the autograd.Function.

Gradients treat the stabiliser m as a constant, as mlstm_kernels does: h does not depend on m except
through `eps`, so this matches true autograd up to O(eps * exp(m)) terms. For the same reason the
gradient of the returned m is ignored (the final state is meant to be fed to the next call, which
is invariant to how (C, n) is scaled by m).

Matmuls run in the input dtype with fp32 accumulation (fp32 inputs use exact "ieee" dots); all gate
math, states and accumulators are fp32. Under TRITON_INTERPRET=1 the same code runs on the CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixer_kernels import triton_launch as launch
from mixer_kernels.mlstm.dispatch import TRITON_CHUNK_SIZES
from mixer_kernels.mlstm.reference import MLSTMState, check_inputs
from mixer_kernels.varlen import packed_call_heads_first

# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _chunk_gates(i_ptr, f_ptr, bh, c, T, L: tl.constexpr):
    """Token indices t, validity, cumulative log forget b (from the chunk start), input gate i and the
    chunk's total log forget g for chunk c; padded tokens get log forget 0 and i = -inf."""
    t = c * L + tl.arange(0, L)
    valid = t < T
    f = tl.load(f_ptr + bh * T + t, mask=valid, other=0.0).to(tl.float32)
    i = tl.load(i_ptr + bh * T + t, mask=valid, other=0.0).to(tl.float32)
    logf = tl.minimum(f, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(f)))  # logsigmoid without libdevice
    logf = tl.where(valid, logf, 0.0)
    b = tl.cumsum(logf, axis=0)
    i = tl.where(valid, i, float("-inf"))
    return t, valid, b, i, tl.sum(logf, axis=0)


@triton.jit
def _mlstm_fw_states_kernel(
    k_ptr, v_ptr, i_ptr, f_ptr, c0_ptr, n0_ptr, m0_ptr,
    cs_ptr, ns_ptr, ms_ptr,  # states at chunk boundaries: (BH, NC+1, DQK, DV), (BH, NC+1, DQK), (BH, NC+1)
    T, NC,
    DQK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_k, pid_v = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    bh = tl.program_id(2).to(tl.int64)
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < DQK, offs_v < DV
    mask_kv = mask_k[:, None] & mask_v[None, :]
    offs_kv = offs_k[:, None] * DV + offs_v[None, :]
    first_v, first_kv = pid_v == 0, (pid_k == 0) & (pid_v == 0)

    C = tl.load(c0_ptr + bh * DQK * DV + offs_kv, mask=mask_kv, other=0.0)  # (BK, BV) fp32
    n = tl.load(n0_ptr + bh * DQK + offs_k, mask=mask_k, other=0.0)  # (BK,)
    m = tl.load(m0_ptr + bh)
    for c in range(NC):
        s = bh * (NC + 1) + c
        tl.store(cs_ptr + s * DQK * DV + offs_kv, C, mask=mask_kv)
        tl.store(ns_ptr + s * DQK + offs_k, n, mask=mask_k & first_v)
        tl.store(ms_ptr + s, m, mask=first_kv)

        t, valid, b, i, g = _chunk_gates(i_ptr, f_ptr, bh, c, T, L)
        a = g - b + i  # (L,) log weight of token l in the next state
        m_next = tl.maximum(g + m, tl.max(a, axis=0))
        kk = tl.load(k_ptr + (bh * T + t[:, None]) * DQK + offs_k[None, :],
                     mask=valid[:, None] & mask_k[None, :], other=0.0)  # (L, BK)
        vv = tl.load(v_ptr + (bh * T + t[:, None]) * DV + offs_v[None, :],
                     mask=valid[:, None] & mask_v[None, :], other=0.0)  # (L, BV)
        k_gated = kk.to(tl.float32) * tl.exp(a - m_next)[:, None]  # (L, BK)
        decay = tl.exp(g + m - m_next)
        C = decay * C + tl.dot(tl.trans(k_gated.to(vv.dtype)), vv, input_precision=PREC)
        n = decay * n + tl.sum(k_gated, axis=0)
        m = m_next
    s = bh * (NC + 1) + NC
    tl.store(cs_ptr + s * DQK * DV + offs_kv, C, mask=mask_kv)
    tl.store(ns_ptr + s * DQK + offs_k, n, mask=mask_k & first_v)
    tl.store(ms_ptr + s, m, mask=first_kv)


@triton.jit
def _mlstm_fw_h_kernel(
    q_ptr, k_ptr, v_ptr, i_ptr, f_ptr, cs_ptr, ns_ptr, ms_ptr,
    h_ptr, mrow_ptr, z_ptr,  # outputs: h (BH, T, DV); per-token stabiliser m and q.n (BH, T)
    T, NC, scale, eps,
    DQK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_v, c = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    bh = tl.program_id(2).to(tl.int64)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mask_v = offs_v < DV
    t, valid, b, i, g = _chunk_gates(i_ptr, f_ptr, bh, c, T, L)
    s = bh * (NC + 1) + c
    m_c = tl.load(ms_ptr + s)

    qk = tl.zeros([L, L], dtype=tl.float32)  # q k^T
    qC = tl.zeros([L, BV], dtype=tl.float32)  # q C_c
    qn = tl.zeros([L], dtype=tl.float32)  # q . n_c
    for kb in range(0, DQK, BK):
        offs_k = kb + tl.arange(0, BK)
        mask_k = offs_k < DQK
        mask_tk = valid[:, None] & mask_k[None, :]
        qq = tl.load(q_ptr + (bh * T + t[:, None]) * DQK + offs_k[None, :], mask=mask_tk, other=0.0)
        kk = tl.load(k_ptr + (bh * T + t[:, None]) * DQK + offs_k[None, :], mask=mask_tk, other=0.0)
        C = tl.load(cs_ptr + s * DQK * DV + offs_k[:, None] * DV + offs_v[None, :],
                    mask=mask_k[:, None] & mask_v[None, :], other=0.0)  # (BK, BV)
        n = tl.load(ns_ptr + s * DQK + offs_k, mask=mask_k, other=0.0)  # (BK,)
        qk += tl.dot(qq, tl.trans(kk), input_precision=PREC)
        qC += tl.dot(qq, C.to(qq.dtype), input_precision=PREC)
        qn += tl.sum(qq.to(tl.float32) * n[None, :], axis=1)

    causal = tl.arange(0, L)[:, None] >= tl.arange(0, L)[None, :]
    log_d = tl.where(causal, b[:, None] - b[None, :] + i[None, :], float("-inf"))  # (L, L)
    m_inter = b + m_c
    m_row = tl.maximum(m_inter, tl.max(log_d, axis=1))  # (L,)
    s_w = qk * scale * tl.exp(log_d - m_row[:, None])  # (L, L)
    w_inter = tl.exp(m_inter - m_row) * scale  # (L,)
    vv = tl.load(v_ptr + (bh * T + t[:, None]) * DV + offs_v[None, :],
                 mask=valid[:, None] & mask_v[None, :], other=0.0)  # (L, BV)
    num = w_inter[:, None] * qC + tl.dot(s_w.to(vv.dtype), vv, input_precision=PREC)  # (L, BV)
    z = w_inter * qn + tl.sum(s_w, axis=1)  # (L,)
    den = tl.maximum(tl.abs(z), tl.exp(-m_row)) + eps
    h = num / den[:, None]
    tl.store(h_ptr + (bh * T + t[:, None]) * DV + offs_v[None, :], h.to(h_ptr.dtype.element_ty),
             mask=valid[:, None] & mask_v[None, :])
    tl.store(mrow_ptr + bh * T + t, m_row, mask=valid & (pid_v == 0))
    tl.store(z_ptr + bh * T + t, z, mask=valid & (pid_v == 0))


@triton.jit
def _mlstm_bw_prep_kernel(
    dh_ptr, h_ptr, mrow_ptr, z_ptr, dz_ptr,  # dz (BH, T) = d loss / d z
    T, eps,
    DV: tl.constexpr, L: tl.constexpr, BV: tl.constexpr,
):
    c, bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    t = c * L + tl.arange(0, L)
    valid = t < T
    dh_h = tl.zeros([L], dtype=tl.float32)
    for vb in range(0, DV, BV):
        offs_v = vb + tl.arange(0, BV)
        mask = valid[:, None] & (offs_v < DV)[None, :]
        dh = tl.load(dh_ptr + (bh * T + t[:, None]) * DV + offs_v[None, :], mask=mask, other=0.0)
        h = tl.load(h_ptr + (bh * T + t[:, None]) * DV + offs_v[None, :], mask=mask, other=0.0)
        dh_h += tl.sum(dh.to(tl.float32) * h.to(tl.float32), axis=1)
    z = tl.load(z_ptr + bh * T + t, mask=valid, other=0.0)
    floor = tl.exp(-tl.load(mrow_ptr + bh * T + t, mask=valid, other=0.0))
    den = tl.maximum(tl.abs(z), floor) + eps
    sign = tl.where(z > 0, 1.0, -1.0)
    dz = tl.where(tl.abs(z) > floor, -dh_h / den * sign, 0.0)  # d|z|/dz only where |z| wins the max
    tl.store(dz_ptr + bh * T + t, dz, mask=valid)


@triton.jit
def _mlstm_bw_dstates_kernel(
    q_ptr, dh_ptr, i_ptr, f_ptr, ms_ptr, mrow_ptr, z_ptr, dz_ptr, dcT_ptr, dnT_ptr,
    dcs_ptr, dns_ptr,  # gradients of the chunk-boundary states: (BH, NC+1, DQK, DV), (BH, NC+1, DQK)
    T, NC, scale, eps,
    DQK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_k, pid_v = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    bh = tl.program_id(2).to(tl.int64)
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < DQK, offs_v < DV
    mask_kv = mask_k[:, None] & mask_v[None, :]
    offs_kv = offs_k[:, None] * DV + offs_v[None, :]
    first_v = pid_v == 0

    dC = tl.load(dcT_ptr + bh * DQK * DV + offs_kv, mask=mask_kv, other=0.0)  # (BK, BV)
    dn = tl.load(dnT_ptr + bh * DQK + offs_k, mask=mask_k, other=0.0)  # (BK,)
    for cc in range(NC):
        c = NC - 1 - cc
        s = bh * (NC + 1) + c + 1
        tl.store(dcs_ptr + s * DQK * DV + offs_kv, dC, mask=mask_kv)
        tl.store(dns_ptr + s * DQK + offs_k, dn, mask=mask_k & first_v)

        t, valid, b, i, g = _chunk_gates(i_ptr, f_ptr, bh, c, T, L)
        m_c = tl.load(ms_ptr + s - 1)
        m_next = tl.load(ms_ptr + s)
        m_row = tl.load(mrow_ptr + bh * T + t, mask=valid, other=0.0)
        z = tl.load(z_ptr + bh * T + t, mask=valid, other=0.0)
        dz = tl.load(dz_ptr + bh * T + t, mask=valid, other=0.0)
        den = tl.maximum(tl.abs(z), tl.exp(-m_row)) + eps
        w_inter = tl.where(valid, tl.exp(b + m_c - m_row), 0.0) * scale  # (L,) weight of C_c in row t
        qq = tl.load(q_ptr + (bh * T + t[:, None]) * DQK + offs_k[None, :],
                     mask=valid[:, None] & mask_k[None, :], other=0.0).to(tl.float32)  # (L, BK)
        dh = tl.load(dh_ptr + (bh * T + t[:, None]) * DV + offs_v[None, :],
                     mask=valid[:, None] & mask_v[None, :], other=0.0)  # (L, BV)
        q_w = qq * (w_inter / den)[:, None]
        decay = tl.exp(g + m_c - m_next)
        dC = decay * dC + tl.dot(tl.trans(q_w.to(dh.dtype)), dh, input_precision=PREC)
        dn = decay * dn + tl.sum(qq * (w_inter * dz)[:, None], axis=0)
    s = bh * (NC + 1)
    tl.store(dcs_ptr + s * DQK * DV + offs_kv, dC, mask=mask_kv)
    tl.store(dns_ptr + s * DQK + offs_k, dn, mask=mask_k & first_v)


@triton.jit
def _mlstm_bw_dqkv_kernel(
    q_ptr, k_ptr, v_ptr, i_ptr, f_ptr, dh_ptr, cs_ptr, ns_ptr, ms_ptr, mrow_ptr, z_ptr, dz_ptr,
    dcs_ptr, dns_ptr,
    dq_ptr, dk_ptr, dv_ptr, di_ptr, dfacc_ptr,  # dq, dk, dv like q, k, v; k.dk and q.dq - k.dk (BH, T)
    T, NC, scale, eps,
    DQK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr,
):
    c, bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    t, valid, b, i, g = _chunk_gates(i_ptr, f_ptr, bh, c, T, L)
    s = bh * (NC + 1) + c
    m_c = tl.load(ms_ptr + s)
    m_next = tl.load(ms_ptr + s + 1)
    m_row = tl.load(mrow_ptr + bh * T + t, mask=valid, other=0.0)
    z = tl.load(z_ptr + bh * T + t, mask=valid, other=0.0)
    dz = tl.load(dz_ptr + bh * T + t, mask=valid, other=0.0)
    inv_den = tl.where(valid, 1.0 / (tl.maximum(tl.abs(z), tl.exp(-m_row)) + eps), 0.0)

    causal = (tl.arange(0, L)[:, None] >= tl.arange(0, L)[None, :]) & valid[:, None]
    # Masked before exp, as in the forward: above the diagonal b_s > b_t can overflow (a reset slot's -1e4).
    w = tl.exp(tl.where(causal, b[:, None] - b[None, :] + i[None, :] - m_row[:, None], float("-inf")))  # (L, L)
    w_row = tl.where(valid, tl.exp(b + m_c - m_row), 0.0) * scale  # weight of C_c in row t
    w_col = tl.exp(g - b + i - m_next)  # weight of token t in C_{c+1}; 0 on padding

    # p[t, l] = d loss / d (q_t . k_l scaled), s_qk[t, l] = q_t . k_l
    dh_v = tl.zeros([L, L], dtype=tl.float32)
    for vb in range(0, DV, BV):
        offs_v = vb + tl.arange(0, BV)
        mask_tv = valid[:, None] & (offs_v < DV)[None, :]
        dh = tl.load(dh_ptr + (bh * T + t[:, None]) * DV + offs_v[None, :], mask=mask_tv, other=0.0)
        vv = tl.load(v_ptr + (bh * T + t[:, None]) * DV + offs_v[None, :], mask=mask_tv, other=0.0)
        dh_v += tl.dot(dh, tl.trans(vv), input_precision=PREC)
    p = w * (dh_v * inv_den[:, None] + dz[:, None]) * scale  # (L, L)
    s_qk = tl.zeros([L, L], dtype=tl.float32)
    for kb in range(0, DQK, BK):
        offs_k = kb + tl.arange(0, BK)
        mask_tk = valid[:, None] & (offs_k < DQK)[None, :]
        qq = tl.load(q_ptr + (bh * T + t[:, None]) * DQK + offs_k[None, :], mask=mask_tk, other=0.0)
        kk = tl.load(k_ptr + (bh * T + t[:, None]) * DQK + offs_k[None, :], mask=mask_tk, other=0.0)
        s_qk += tl.dot(qq, tl.trans(kk), input_precision=PREC)
    s_w = w * s_qk * scale * inv_den[:, None]  # (L, L) weight of dh_t in dv_l

    k_dk = tl.zeros([L], dtype=tl.float32)
    q_dq = tl.zeros([L], dtype=tl.float32)
    for kb in range(0, DQK, BK):
        offs_k = kb + tl.arange(0, BK)
        mask_k = offs_k < DQK
        mask_tk = valid[:, None] & mask_k[None, :]
        qq = tl.load(q_ptr + (bh * T + t[:, None]) * DQK + offs_k[None, :], mask=mask_tk, other=0.0)
        kk = tl.load(k_ptr + (bh * T + t[:, None]) * DQK + offs_k[None, :], mask=mask_tk, other=0.0)
        dh_C = tl.zeros([L, BK], dtype=tl.float32)  # dh C_c^T
        v_dC = tl.zeros([L, BK], dtype=tl.float32)  # v dC_{c+1}^T
        for vb in range(0, DV, BV):
            offs_v = vb + tl.arange(0, BV)
            mask_v = offs_v < DV
            mask_tv = valid[:, None] & mask_v[None, :]
            mask_kv = mask_k[:, None] & mask_v[None, :]
            offs_kv = offs_k[:, None] * DV + offs_v[None, :]
            dh = tl.load(dh_ptr + (bh * T + t[:, None]) * DV + offs_v[None, :], mask=mask_tv, other=0.0)
            vv = tl.load(v_ptr + (bh * T + t[:, None]) * DV + offs_v[None, :], mask=mask_tv, other=0.0)
            C = tl.load(cs_ptr + s * DQK * DV + offs_kv, mask=mask_kv, other=0.0)
            dC = tl.load(dcs_ptr + (s + 1) * DQK * DV + offs_kv, mask=mask_kv, other=0.0)
            dh_C += tl.dot(dh, tl.trans(C.to(dh.dtype)), input_precision=PREC)
            v_dC += tl.dot(vv, tl.trans(dC.to(vv.dtype)), input_precision=PREC)
        n = tl.load(ns_ptr + s * DQK + offs_k, mask=mask_k, other=0.0)
        dn = tl.load(dns_ptr + (s + 1) * DQK + offs_k, mask=mask_k, other=0.0)
        dq = tl.dot(p.to(kk.dtype), kk, input_precision=PREC)
        dq += w_row[:, None] * (dh_C * inv_den[:, None] + dz[:, None] * n[None, :])
        dk = tl.dot(tl.trans(p).to(qq.dtype), qq, input_precision=PREC)
        dk += w_col[:, None] * (v_dC + dn[None, :])
        tl.store(dq_ptr + (bh * T + t[:, None]) * DQK + offs_k[None, :], dq.to(dq_ptr.dtype.element_ty),
                 mask=mask_tk)
        tl.store(dk_ptr + (bh * T + t[:, None]) * DQK + offs_k[None, :], dk.to(dk_ptr.dtype.element_ty),
                 mask=mask_tk)
        q_dq += tl.sum(qq.to(tl.float32) * dq, axis=1)
        k_dk += tl.sum(kk.to(tl.float32) * dk, axis=1)

    for vb in range(0, DV, BV):
        offs_v = vb + tl.arange(0, BV)
        mask_v = offs_v < DV
        mask_tv = valid[:, None] & mask_v[None, :]
        dh = tl.load(dh_ptr + (bh * T + t[:, None]) * DV + offs_v[None, :], mask=mask_tv, other=0.0)
        k_dC = tl.zeros([L, BV], dtype=tl.float32)  # k dC_{c+1}
        for kb in range(0, DQK, BK):
            offs_k = kb + tl.arange(0, BK)
            mask_k = offs_k < DQK
            kk = tl.load(k_ptr + (bh * T + t[:, None]) * DQK + offs_k[None, :],
                         mask=valid[:, None] & mask_k[None, :], other=0.0)
            dC = tl.load(dcs_ptr + (s + 1) * DQK * DV + offs_k[:, None] * DV + offs_v[None, :],
                         mask=mask_k[:, None] & mask_v[None, :], other=0.0)
            k_dC += tl.dot(kk, dC.to(kk.dtype), input_precision=PREC)
        dv = tl.dot(tl.trans(s_w).to(dh.dtype), dh, input_precision=PREC) + w_col[:, None] * k_dC
        tl.store(dv_ptr + (bh * T + t[:, None]) * DV + offs_v[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=mask_tv)
    tl.store(di_ptr + bh * T + t, k_dk, mask=valid)
    tl.store(dfacc_ptr + bh * T + t, q_dq - k_dk, mask=valid)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------

NUM_WARPS = 8
# Two pipeline stages for the forward state walk, not Triton's default three: the third stage's prefetch
# took it to a stack frame at small fp32 heads (the recall recipe's 16 x 32, mixer_kernels/aot.py).
FW_STATES_STAGES = 2


def _blocks(dqk: int, dv: int, dtype: torch.dtype) -> tuple[int, int]:
    """Tile sizes for DQK and DV: 32 in bf16/fp16 and 16 in fp32, at least 16 (tl.dot's minimum). With
    NUM_WARPS = 8 that keeps every kernel within the spill budget at every shipped head size
    (tests/kernels/test_aot.py): 64-wide tiles spilled 2-3 KB a thread in the dq/dk/dv kernel."""
    cap = 32 if dtype != torch.float32 else 16
    return (min(max(triton.next_power_of_2(dqk), 16), cap), min(max(triton.next_power_of_2(dv), 16), cap))


def _states_fw(k, v, i, f, c0, n0, m0, chunk_size):
    """States at every chunk boundary: C (BH, NC+1, DQK, DV), n (BH, NC+1, DQK), m (BH, NC+1), fp32."""
    B, NH, T, DQK = k.shape
    DV = v.shape[-1]
    NC = triton.cdiv(T, chunk_size)
    BK, BV = _blocks(DQK, DV, k.dtype)
    cs = launch.alloc(B * NH, NC + 1, DQK, DV, dtype=torch.float32, device=k.device)
    ns = launch.alloc(B * NH, NC + 1, DQK, dtype=torch.float32, device=k.device)
    ms = launch.alloc(B * NH, NC + 1, dtype=torch.float32, device=k.device)
    grid = (triton.cdiv(DQK, BK), triton.cdiv(DV, BV), B * NH)
    _mlstm_fw_states_kernel[grid](
        k, v, i, f, c0, n0, m0, cs, ns, ms, T, NC,
        DQK=DQK, DV=DV, L=chunk_size, BK=BK, BV=BV, PREC=launch.dot_precision(k.dtype), num_warps=NUM_WARPS,
        num_stages=FW_STATES_STAGES,
    )
    return cs, ns, ms


def _mlstm_fw(q, k, v, i, f, c0, n0, m0, chunk_size, eps):
    """h (B, NH, T, DV), per-token m and z (BH, T), final state; inputs contiguous."""
    B, NH, T, DQK = q.shape
    DV = v.shape[-1]
    NC = triton.cdiv(T, chunk_size)
    BK, BV = _blocks(DQK, DV, q.dtype)
    cs, ns, ms = _states_fw(k, v, i, f, c0, n0, m0, chunk_size)
    h = launch.alloc(B, NH, T, DV, dtype=q.dtype, device=q.device)
    m_row = launch.alloc(B * NH, T, dtype=torch.float32, device=q.device)
    z = launch.alloc(B * NH, T, dtype=torch.float32, device=q.device)
    _mlstm_fw_h_kernel[(triton.cdiv(DV, BV), NC, B * NH)](
        q, k, v, i, f, cs, ns, ms, h, m_row, z, T, NC, DQK**-0.5, eps,
        DQK=DQK, DV=DV, L=chunk_size, BK=BK, BV=BV, PREC=launch.dot_precision(q.dtype), num_warps=NUM_WARPS,
    )
    final = (cs[:, NC].view(B, NH, DQK, DV), ns[:, NC].view(B, NH, DQK), ms[:, NC].view(B, NH, 1))
    return h, m_row, z, tuple(x.clone() for x in final)


def _mlstm_bw(q, k, v, i, f, c0, n0, m0, h, m_row, z, dh, dcT, dnT, chunk_size, eps, layout=None):
    """Gradients of q, k, v, i, f and of the initial state (C, n, m); inputs contiguous; `layout`: packed
    documents (mixer_kernels/varlen.py), whose d logf sums run within each document."""
    B, NH, T, DQK = q.shape
    DV = v.shape[-1]
    NC = triton.cdiv(T, chunk_size)
    BK, BV = _blocks(DQK, DV, q.dtype)
    prec = launch.dot_precision(q.dtype)
    cs, ns, ms = _states_fw(k, v, i, f, c0, n0, m0, chunk_size)  # recomputed, see module docstring

    dz = launch.alloc(B * NH, T, dtype=torch.float32, device=q.device)
    _mlstm_bw_prep_kernel[(NC, B * NH)](
        dh, h, m_row, z, dz, T, eps, DV=DV, L=chunk_size, BV=BV, num_warps=NUM_WARPS,
    )
    dcs = launch.alloc(B * NH, NC + 1, DQK, DV, dtype=torch.float32, device=q.device)
    dns = launch.alloc(B * NH, NC + 1, DQK, dtype=torch.float32, device=q.device)
    _mlstm_bw_dstates_kernel[(triton.cdiv(DQK, BK), triton.cdiv(DV, BV), B * NH)](
        q, dh, i, f, ms, m_row, z, dz, dcT, dnT, dcs, dns, T, NC, DQK**-0.5, eps,
        DQK=DQK, DV=DV, L=chunk_size, BK=BK, BV=BV, PREC=prec, num_warps=NUM_WARPS,
    )
    dq = launch.alloc(*q.shape, dtype=q.dtype, device=q.device)
    dk = launch.alloc(*k.shape, dtype=k.dtype, device=q.device)
    dv = launch.alloc(*v.shape, dtype=v.dtype, device=q.device)
    di = launch.alloc(B * NH, T, dtype=torch.float32, device=q.device)
    df_acc = launch.alloc(B * NH, T, dtype=torch.float32, device=q.device)
    _mlstm_bw_dqkv_kernel[(NC, B * NH)](
        q, k, v, i, f, dh, cs, ns, ms, m_row, z, dz, dcs, dns, dq, dk, dv, di, df_acc,
        T, NC, DQK**-0.5, eps,
        DQK=DQK, DV=DV, L=chunk_size, BK=BK, BV=BV, PREC=prec, num_warps=NUM_WARPS,
    )

    # d loss / d logsigmoid(f_t): every weight exp(F_t' - F_s) with s <= t <= t' depends on it; the
    # final state scales as exp(F_T), giving <C_T, dC_T> + <n_T, dn_T> for every t.
    final_term = (cs[:, NC] * dcT.view(B * NH, DQK, DV)).sum((-2, -1)) + (ns[:, NC] * dnT.view(B * NH, DQK)).sum(-1)
    suffix_sum = df_acc.flip(-1).cumsum(-1).flip(-1) if layout is None else layout.reverse_cumsum(df_acc)
    dlogf = suffix_sum + final_term[:, None]  # (BH, T)
    df = (dlogf * torch.sigmoid(-f.float().view(B * NH, T))).view(B, NH, T).to(f.dtype)
    di = di.view(B, NH, T).to(i.dtype)
    dc0 = dcs[:, 0].view(B, NH, DQK, DV)
    dn0 = dns[:, 0].view(B, NH, DQK)
    # (C0, n0) stand for exp(m0) * (C0, n0): d m0 = <dC0, C0> + <dn0, n0>
    dm0 = ((dc0 * c0).sum((-2, -1)) + (dn0 * n0).sum(-1))[..., None]
    return dq, dk, dv, di, df, dc0.clone(), dn0.clone(), dm0


# ----------------------------------------------------------------------------------------------------
# autograd.Function and the public function
# ----------------------------------------------------------------------------------------------------


class _MLSTMChunkwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, i, f, c0, n0, m0, chunk_size, eps, layout=None):
        with launch.on_device(q):
            h, m_row, z, (cT, nT, mT) = _mlstm_fw(q, k, v, i, f, c0, n0, m0, chunk_size, eps)
        ctx.save_for_backward(q, k, v, i, f, c0, n0, m0, h, m_row, z)
        ctx.chunk_size, ctx.eps, ctx.layout = chunk_size, eps, layout
        ctx.mark_non_differentiable(mT)
        return h, cT, nT, mT

    @staticmethod
    def backward(ctx, dh, dcT, dnT, _dmT):
        q, k, v, i, f, c0, n0, m0, h, m_row, z = ctx.saved_tensors
        dh = dh.to(q.dtype).contiguous()
        dcT = torch.zeros_like(c0) if dcT is None else dcT.float().contiguous()
        dnT = torch.zeros_like(n0) if dnT is None else dnT.float().contiguous()
        with launch.on_device(q):
            grads = _mlstm_bw(q, k, v, i, f, c0, n0, m0, h, m_row, z, dh, dcT, dnT, ctx.chunk_size, ctx.eps,
                              ctx.layout)
        return (*grads, None, None, None)


def mlstm_chunkwise_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i_preact: torch.Tensor,
    f_preact: torch.Tensor,
    initial_state: MLSTMState | None = None,
    chunk_size: int = 64,
    eps: float = 1e-6,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, MLSTMState]:
    """Chunkwise mLSTM with Triton kernels, differentiable in all inputs and the initial state. With
    `cu_seqlens` (packed documents, B = 1, the flattened tokens on the time axis) each document runs as a
    fresh sequence in one launch per kernel (mixer_kernels/varlen.py), and no final state is returned.

    q, k: (B, NH, T, DQK); v: (B, NH, T, DV) (one dtype: fp32, bf16 or fp16); i_preact, f_preact:
    (B, NH, T); initial_state: (C (B,NH,DQK,DV), n (B,NH,DQK), m (B,NH,1)) or None.
    Returns h (B, NH, T, DV) in q's dtype and the final fp32 state (C, n, m).
    chunk_size (16, 32 or 64) only trades speed for memory, the math is the same.

    Example (CUDA, or CPU with TRITON_INTERPRET=1):
        >>> q = k = torch.randn(1, 2, 100, 32, device="cuda"); v = torch.randn(1, 2, 100, 48, device="cuda")
        >>> i = f = torch.randn(1, 2, 100, device="cuda")
        >>> h, (C, n, m) = mlstm_chunkwise_triton(q, k, v, i, f, chunk_size=64)
    """
    check_inputs(q, k, v, i_preact, f_preact, initial_state)
    launch.check_half_or_fp32(q, k, v)
    launch.check_chunk(chunk_size, TRITON_CHUNK_SIZES)
    B, NH, T, DQK = q.shape
    DV = v.shape[-1]
    if cu_seqlens is not None:
        zeros = [torch.zeros(1, NH, *shape, dtype=torch.float32, device=q.device) for shape in ((DQK, DV), (DQK,), (1,))]

        def run(layout, q, k, v, f, i):
            heads = (t.contiguous() for t in (q, k, v, i, f))
            return _MLSTMChunkwise.apply(*heads, *zeros, chunk_size, eps, layout)[0]

        return packed_call_heads_first(run, cu_seqlens, chunk_size, initial_state, q, k, v, f_preact, i_preact)
    if initial_state is None:
        initial_state = (
            torch.zeros(B, NH, DQK, DV, dtype=torch.float32, device=q.device),
            torch.zeros(B, NH, DQK, dtype=torch.float32, device=q.device),
            torch.zeros(B, NH, 1, dtype=torch.float32, device=q.device),
        )
    c0, n0, m0 = (s.float().contiguous() for s in initial_state)
    h, cT, nT, mT = _MLSTMChunkwise.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), i_preact.contiguous(), f_preact.contiguous(),
        c0, n0, m0, chunk_size, eps,
    )
    return h, (cT, nT, mT)


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (used by the AOT compile test for sm_80 / sm_90)
# ----------------------------------------------------------------------------------------------------


def aot_specs(dqk: int, dv: int, chunk_size: int, dtype: str) -> list[dict]:
    """The kernels one call at these head sizes, chunk and dtype ('fp32', 'bf16', 'fp16') launches, as
    ahead-of-time compile entries (mixer_kernels/aot.py)."""
    torch_dtype = dict(launch.DTYPES)[dtype]
    in_dtype = {"q_ptr", "k_ptr", "v_ptr", "i_ptr", "f_ptr", "h_ptr", "dh_ptr", "dq_ptr", "dk_ptr", "dv_ptr"}
    bk, bv = _blocks(dqk, dv, torch_dtype)
    sizes = {"DQK": dqk, "DV": dv, "L": chunk_size, "BK": bk, "BV": bv, "PREC": launch.dot_precision(torch_dtype)}
    # inputs and their gradients in the model dtype; states, gate math, scalars in fp32 / i32
    kernels = (
        (_mlstm_fw_states_kernel, sizes),
        (_mlstm_fw_h_kernel, sizes),
        (_mlstm_bw_prep_kernel, {"DV": dv, "L": chunk_size, "BV": bv}),
        (_mlstm_bw_dstates_kernel, sizes),
        (_mlstm_bw_dqkv_kernel, sizes),
    )
    return [launch.aot_spec(fn, consts, dtype, in_dtype, NUM_WARPS, chunk_size=chunk_size,
                            num_stages=FW_STATES_STAGES if fn is _mlstm_fw_states_kernel else None)
            for fn, consts in kernels]


# xLSTM-7B's head sizes (DQK 256, DV 512) in its chunk of 64 tokens, every dtype; bench/kernel_resources.py
# adds every shipped config's shape.
AOT_KERNELS: list[dict] = [spec for dtype, _ in launch.DTYPES for spec in aot_specs(256, 512, 64, dtype)]
