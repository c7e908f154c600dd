"""Chunkwise gated linear attention (decay per key dimension) in Triton, forward and backward.

Same math as `reference.gla_chunk`. Layout is flash-linear-attention's: q, k, g (B, T, H, K), v (B, T, H, V),
state (B, H, K, V) fp32. The launcher pads T to a multiple of the chunk L (padded tokens have q = k = v
= 0 and g = 0, so they change nothing), which keeps time masks out of the kernels; K and V need not be
powers of two (masked loads, KF = K rounded up to a power of two).

Kernels (all walk one head; "state tile" = (KF, BV) fp32 in registers):
  1. `_gla_fwd_kernel`, grid (V blocks, B*H): walks the chunks in order, keeping the state tile; writes
     o and the final state, or, when recomputing for the backward, the state at every chunk boundary
     (NC + 1 of them). States are not kept from the forward: (NC + 1) * K * V fp32 per head would be
     the largest activation of the model, and recomputing costs one pass of this kernel.
  2. `_gla_bwd_dstates_kernel`, grid (V blocks, B*H): walks the chunks backwards and writes d loss / d S
     at every chunk boundary; the first one is the initial-state gradient.
  3. `_gla_bwd_chunk_kernel`, grid (NC, B*H): dq, dk, dv of one chunk from the two state sequences, and
     q*dq - k*dk per element, whose reverse cumulative sum over time (done in PyTorch, O(T K)) is
     d loss / d g (plus <S_T, dS_T> from the final state, the same for every t).
Intra-chunk weights exp(b_t - b_s) (b = cumulative log decay from the chunk start, s <= t) are formed
pairwise over (L, L, BK) tiles and never factored as exp(b_t) * exp(-b_s), which overflows fp32 when
decays are strong (HGRN2's first layer has no lower bound on its forget gates). That is why the default
chunk is 16 tokens: the pairwise tile stays small in registers.

Matmuls and all accumulation are fp32 ("ieee" dots for fp32 inputs, tf32 otherwise: TF32 adds at most
3e-3 rel-RMS at real head sizes, a third of what bf16 operands would, tests/kernels/test_tf32.py). Under
TRITON_INTERPRET=1 the same code runs on the CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixer_kernels import triton_launch as launch
from mixer_kernels.gla.dispatch import TRITON_CHUNK_SIZES, TRITON_MAX_KEY_DIM
from mixer_kernels.gla.reference import check_inputs
from mixer_kernels.varlen import packed_call

# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _pairwise_decay(g_ptr, rows_k, offs_k, mask_k, causal):
    """Load a (L, BK) tile of log decays, return its chunk cumsum b and exp(b_t - b_s) (L, L, BK),
    zero above the diagonal (masked before exp: b_t - b_s > 0 there and could overflow)."""
    g = tl.load(g_ptr + rows_k[:, None] + offs_k[None, :], mask=mask_k[None, :], other=0.0).to(tl.float32)
    b = tl.cumsum(g, axis=0)
    diff = tl.where(causal[:, :, None], b[:, None, :] - b[None, :, :], float("-inf"))
    return b, tl.exp(diff)


@triton.jit
def _gla_fwd_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, h0_ptr,
    o_ptr, ht_ptr, hs_ptr,  # o like v; final state (BH, K, V); boundary states (BH, NC+1, K, V)
    T, H, scale,
    K: tl.constexpr, V: tl.constexpr, L: tl.constexpr, KF: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, RECOMPUTE: tl.constexpr, PREC: tl.constexpr,
):
    pid_v, bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    b_idx, h = bh // H, bh % H
    NC = T // L
    rows = tl.arange(0, L)
    causal = rows[:, None] >= rows[None, :]
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
        rows_k, rows_v = tok * K, tok * V
        v = tl.load(v_ptr + rows_v[:, None] + offs_v[None, :], mask=mask_v[None, :], other=0.0).to(tl.float32)
        # The intra-chunk part first, in (L, L, BK) tiles, before any (L, KF) tile is live: keeping the
        # whole-K q, k and decays alive across this loop spilled registers at K = 256.
        if not RECOMPUTE:
            A = tl.zeros([L, L], dtype=tl.float32)  # sum_k q_t k_s exp(b_t - b_s), s <= t
            for kb in range(0, K, BK):
                offs_k = kb + tl.arange(0, BK)
                mask_k = offs_k < K
                _, decay = _pairwise_decay(g_ptr, rows_k, offs_k, mask_k, causal)
                qb = tl.load(q_ptr + rows_k[:, None] + offs_k[None, :], mask=mask_k[None, :], other=0.0)
                kb_ = tl.load(k_ptr + rows_k[:, None] + offs_k[None, :], mask=mask_k[None, :], other=0.0)
                A += tl.sum(qb.to(tl.float32)[:, None, :] * kb_.to(tl.float32)[None, :, :] * decay, axis=2)
        g = tl.load(g_ptr + rows_k[:, None] + offs_kf[None, :], mask=mask_kf[None, :], other=0.0).to(tl.float32)
        b = tl.cumsum(g, axis=0)  # (L, KF)
        b_last = tl.sum(g, axis=0)  # (KF,)
        if not RECOMPUTE:
            q = tl.load(q_ptr + rows_k[:, None] + offs_kf[None, :], mask=mask_kf[None, :], other=0.0).to(tl.float32)
            o = tl.dot(q * tl.exp(b), S, input_precision=PREC) + tl.dot(A, v, input_precision=PREC)
            tl.store(o_ptr + rows_v[:, None] + offs_v[None, :], (o * scale).to(o_ptr.dtype.element_ty),
                     mask=mask_v[None, :])
        k = tl.load(k_ptr + rows_k[:, None] + offs_kf[None, :], mask=mask_kf[None, :], other=0.0).to(tl.float32)
        k_dec = k * tl.exp(b_last[None, :] - b)  # (L, KF) weight of token s in the next state
        S = tl.exp(b_last)[:, None] * S + tl.dot(tl.trans(k_dec), v, input_precision=PREC)
    if RECOMPUTE:
        tl.store(hs_ptr + (bh * (NC + 1) + NC) * K * V + offs_kv, S, mask=mask_kv)
    else:
        tl.store(ht_ptr + bh * K * V + offs_kv, S, mask=mask_kv)


@triton.jit
def _gla_bwd_dstates_kernel(
    q_ptr, g_ptr, do_ptr, dht_ptr,
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
        rows_k, rows_v = tok * K, tok * V
        q = tl.load(q_ptr + rows_k[:, None] + offs_kf[None, :], mask=mask_kf[None, :], other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rows_k[:, None] + offs_kf[None, :], mask=mask_kf[None, :], other=0.0).to(tl.float32)
        do = tl.load(do_ptr + rows_v[:, None] + offs_v[None, :], mask=mask_v[None, :], other=0.0).to(tl.float32)
        b = tl.cumsum(g, axis=0)
        b_last = tl.sum(g, axis=0)
        q_dec = q * tl.exp(b) * scale  # (L, KF) weight of S_c in o_t
        dS = tl.exp(b_last)[:, None] * dS + tl.dot(tl.trans(q_dec), do, input_precision=PREC)
    tl.store(dhs_ptr + (bh * (NC + 1)) * K * V + offs_kv, dS, mask=mask_kv)


@triton.jit
def _gla_bwd_chunk_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, do_ptr, hs_ptr, dhs_ptr,
    dq_ptr, dk_ptr, dv_ptr, dgacc_ptr,  # dq, dk, dv like q, k, v; q*dq - k*dk (B, T, H, K) fp32
    T, H, scale,
    K: tl.constexpr, V: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr,
):
    c, bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    b_idx, h = bh // H, bh % H
    NC = T // L
    rows = tl.arange(0, L)
    causal = rows[:, None] >= rows[None, :]
    tok = (b_idx * T + c * L + rows) * H + h
    rows_k, rows_v = tok * K, tok * V
    s_c = (bh * (NC + 1) + c) * K * V  # offset of S_c; S_{c+1} and dS_{c+1} follow at + K * V

    # dA[t, s] = do_t . v_s (s <= t) and A[t, s] = sum_k q_t k_s exp(b_t - b_s), both over full V / K.
    dA = tl.zeros([L, L], dtype=tl.float32)
    for vb in range(0, V, BV):
        offs_v = vb + tl.arange(0, BV)
        mask_v = offs_v < V
        do = tl.load(do_ptr + rows_v[:, None] + offs_v[None, :], mask=mask_v[None, :], other=0.0)
        v = tl.load(v_ptr + rows_v[:, None] + offs_v[None, :], mask=mask_v[None, :], other=0.0)
        dA += tl.dot(do.to(tl.float32), tl.trans(v.to(tl.float32)), input_precision=PREC)
    dA = tl.where(causal, dA, 0.0) * scale
    A = tl.zeros([L, L], dtype=tl.float32)

    for kb in range(0, K, BK):
        offs_k = kb + tl.arange(0, BK)
        mask_k = offs_k < K
        b, decay = _pairwise_decay(g_ptr, rows_k, offs_k, mask_k, causal)  # (L, BK), (L, L, BK)
        b_last = tl.sum(tl.where(rows[:, None] == L - 1, b, 0.0), axis=0)  # (BK,)
        q = tl.load(q_ptr + rows_k[:, None] + offs_k[None, :], mask=mask_k[None, :], other=0.0).to(tl.float32)
        k = tl.load(k_ptr + rows_k[:, None] + offs_k[None, :], mask=mask_k[None, :], other=0.0).to(tl.float32)
        A += tl.sum(q[:, None, :] * k[None, :, :] * decay, axis=2)
        do_S = tl.zeros([L, BK], dtype=tl.float32)  # do S_c^T
        v_dS = tl.zeros([L, BK], dtype=tl.float32)  # v dS_{c+1}^T
        for vb in range(0, V, BV):
            offs_v = vb + tl.arange(0, BV)
            mask_v = offs_v < V
            offs_kv = offs_k[:, None] * V + offs_v[None, :]
            mask_kv = mask_k[:, None] & mask_v[None, :]
            do = tl.load(do_ptr + rows_v[:, None] + offs_v[None, :], mask=mask_v[None, :], other=0.0)
            v = tl.load(v_ptr + rows_v[:, None] + offs_v[None, :], mask=mask_v[None, :], other=0.0)
            S = tl.load(hs_ptr + s_c + offs_kv, mask=mask_kv, other=0.0)
            dS = tl.load(dhs_ptr + s_c + K * V + offs_kv, mask=mask_kv, other=0.0)
            do_S += tl.dot(do.to(tl.float32), tl.trans(S), input_precision=PREC)
            v_dS += tl.dot(v.to(tl.float32), tl.trans(dS), input_precision=PREC)
        dq = tl.exp(b) * do_S * scale + tl.sum(dA[:, :, None] * k[None, :, :] * decay, axis=1)
        dk = tl.sum(dA[:, :, None] * q[:, None, :] * decay, axis=0) + tl.exp(b_last[None, :] - b) * v_dS
        mask_tk = mask_k[None, :] & (rows[:, None] >= 0)
        tl.store(dq_ptr + rows_k[:, None] + offs_k[None, :], dq.to(dq_ptr.dtype.element_ty), mask=mask_tk)
        tl.store(dk_ptr + rows_k[:, None] + offs_k[None, :], dk.to(dk_ptr.dtype.element_ty), mask=mask_tk)
        tl.store(dgacc_ptr + rows_k[:, None] + offs_k[None, :], q * dq - k * dk, mask=mask_tk)

    A = A * scale
    for vb in range(0, V, BV):
        offs_v = vb + tl.arange(0, BV)
        mask_v = offs_v < V
        do = tl.load(do_ptr + rows_v[:, None] + offs_v[None, :], mask=mask_v[None, :], other=0.0)
        dv = tl.dot(tl.trans(A), do.to(tl.float32), input_precision=PREC)  # (L, BV)
        for kb in range(0, K, BK):
            offs_k = kb + tl.arange(0, BK)
            mask_k = offs_k < K
            g = tl.load(g_ptr + rows_k[:, None] + offs_k[None, :], mask=mask_k[None, :], other=0.0).to(tl.float32)
            b = tl.cumsum(g, axis=0)
            k = tl.load(k_ptr + rows_k[:, None] + offs_k[None, :], mask=mask_k[None, :], other=0.0).to(tl.float32)
            dS = tl.load(dhs_ptr + s_c + K * V + offs_k[:, None] * V + offs_v[None, :],
                         mask=mask_k[:, None] & mask_v[None, :], other=0.0)
            k_dec = k * tl.exp(tl.sum(g, axis=0)[None, :] - b)
            dv += tl.dot(k_dec, dS, input_precision=PREC)
        tl.store(dv_ptr + rows_v[:, None] + offs_v[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=mask_v[None, :] & (rows[:, None] >= 0))


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------


def _tiles(K: int, V: int) -> tuple[int, int, int, int]:
    """(KF, BK, BV, num_warps): the whole key dim as one state tile (the state needs all of K for
    q S and for the decay), K in blocks of 32 for the pairwise (L, L, BK) tiles, V in blocks of 32, or
    of 16 above K = 128, where the (KF, 32) state tile spilled registers in the forward."""
    kf = max(triton.next_power_of_2(K), 16)
    bv = min(max(triton.next_power_of_2(V), 16), 32 if kf <= 128 else 16)
    return kf, min(kf, 32), bv, 4 if kf <= 128 else 8


def _fwd(q, k, v, g, h0, scale, chunk_size, recompute):
    """Inputs contiguous with T a multiple of chunk_size. Returns (o, final state) or the NC + 1
    boundary states (BH, NC+1, K, V) when recomputing for the backward."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    NC = T // chunk_size
    KF, BK, BV, warps = _tiles(K, V)
    if recompute:
        o = ht = q  # unused pointers
        hs = launch.alloc(B * H, NC + 1, K, V, dtype=torch.float32, device=q.device)
    else:
        o = launch.alloc(B, T, H, V, dtype=v.dtype, device=q.device)
        ht = launch.alloc(B, H, K, V, dtype=torch.float32, device=q.device)
        hs = ht  # unused pointer
    _gla_fwd_kernel[(triton.cdiv(V, BV), B * H)](
        q, k, v, g, h0, o, ht, hs, T, H, scale,
        K=K, V=V, L=chunk_size, KF=KF, BK=BK, BV=BV, RECOMPUTE=recompute, PREC=launch.dot_precision(q.dtype),
        num_warps=warps,
    )
    return hs if recompute else (o, ht)


def _bwd(q, k, v, g, h0, do, dht, scale, chunk_size, layout=None):
    """Gradients of q, k, v, g and the initial state; inputs contiguous, T a multiple of chunk_size;
    `layout`: packed documents (mixer_kernels/varlen.py), whose d g sums run within each document."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    NC = T // chunk_size
    KF, BK, BV, warps = _tiles(K, V)
    prec = launch.dot_precision(q.dtype)
    hs = _fwd(q, k, v, g, h0, scale, chunk_size, recompute=True)
    dhs = launch.alloc(B * H, NC + 1, K, V, dtype=torch.float32, device=q.device)
    dq = launch.alloc(*q.shape, dtype=q.dtype, device=q.device)
    dk = launch.alloc(*k.shape, dtype=k.dtype, device=q.device)
    dv = launch.alloc(*v.shape, dtype=v.dtype, device=q.device)
    dgacc = launch.alloc(*g.shape, dtype=torch.float32, device=q.device)
    _gla_bwd_dstates_kernel[(triton.cdiv(V, BV), B * H)](
        q, g, do, dht, dhs, T, H, scale, K=K, V=V, L=chunk_size, KF=KF, BV=BV, PREC=prec, num_warps=warps,
    )
    _gla_bwd_chunk_kernel[(NC, B * H)](
        q, k, v, g, do, hs, dhs, dq, dk, dv, dgacc, T, H, scale,
        K=K, V=V, L=chunk_size, BK=BK, BV=BV, PREC=prec, num_warps=warps,
    )
    # d g_t = sum over t' >= t of (q dq - k dk)_t', plus <S_T, dS_T> over V (S_T decays by every g_t).
    final = (hs[:, NC] * dht.view(B * H, K, V)).sum(-1).view(B, 1, H, K)
    dg = (dgacc.flip(1).cumsum(1).flip(1) if layout is None else layout.reverse_cumsum(dgacc)) + final
    return dq, dk, dv, dg.to(g.dtype), dhs[:, 0].view(B, H, K, V).clone()


# ----------------------------------------------------------------------------------------------------
# autograd.Function and the public function
# ----------------------------------------------------------------------------------------------------


class _ChunkGLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, h0, scale, chunk_size, layout):
        with launch.on_device(q):
            o, ht = _fwd(q, k, v, g, h0, scale, chunk_size, recompute=False)
        ctx.save_for_backward(q, k, v, g, h0)
        ctx.scale, ctx.chunk_size, ctx.layout = scale, chunk_size, layout
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0 = ctx.saved_tensors
        do = torch.zeros_like(v) if do is None else do.to(v.dtype).contiguous()
        dht = torch.zeros_like(h0) if dht is None else dht.float().contiguous()
        with launch.on_device(q):
            dq, dk, dv, dg, dh0 = _bwd(q, k, v, g, h0, do, dht, ctx.scale, ctx.chunk_size, ctx.layout)
        return dq, dk, dv, dg, dh0, None, None, None


def chunk_gla_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 16,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise GLA with Triton kernels, differentiable in q, k, v, g and the initial state.

    q, k, g: (B, T, H, K); v: (B, T, H, V) (one dtype: fp32, bf16 or fp16); g is the log decay (<= 0);
    initial_state: (B, H, K, V) or None. scale defaults to K ** -0.5.
    Returns o (B, T, H, V) in v's dtype and the final state (B, H, K, V) fp32. With `cu_seqlens`
    (packed documents, B = 1 over the flattened tokens, as fla's) each document runs alone, in one
    launch per kernel (mixer_kernels/varlen.py), and no final state is returned.

    Example (CUDA, or CPU with TRITON_INTERPRET=1):
        >>> q, k = torch.randn(2, 2, 100, 2, 64, device="cuda").unbind(0)
        >>> g = torch.nn.functional.logsigmoid(torch.randn(2, 100, 2, 64, device="cuda"))
        >>> o, state = chunk_gla_triton(q, k, torch.randn(2, 100, 2, 48, device="cuda"), g)
    """
    check_inputs(q, k, v, g, initial_state)
    launch.check_half_or_fp32(q, k, v)
    launch.check_chunk(chunk_size, TRITON_CHUNK_SIZES)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if K > TRITON_MAX_KEY_DIM:
        raise ValueError(f"the Triton GLA kernel takes key dims up to {TRITON_MAX_KEY_DIM}, got {K}")
    scale = K**-0.5 if scale is None else scale
    if cu_seqlens is not None:
        def run(layout, *packed):  # packed: chunk-aligned already
            h0 = launch.initial_state(None, (1, H, K, V), q.device)
            return _ChunkGLA.apply(*launch.pad_time(chunk_size, *packed), h0, scale, chunk_size, layout)[0]

        return packed_call(run, cu_seqlens, chunk_size, initial_state, q, k, v, g)
    q, k, v, g = launch.pad_time(chunk_size, q, k, v, g.float())
    h0 = launch.initial_state(initial_state, (B, H, K, V), q.device)
    o, ht = _ChunkGLA.apply(q, k, v, g, h0, scale, chunk_size, None)
    return o[:, :T], ht


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (used by the AOT compile test for sm_80 / sm_90)
# ----------------------------------------------------------------------------------------------------


def aot_specs(k: int, v: int, chunk_size: int, dtype: str) -> list[dict]:
    """The kernels one call at these head sizes, chunk and dtype ('fp32', 'bf16', 'fp16') launches, as
    ahead-of-time compile entries (mixer_kernels/aot.py)."""
    in_dtype = {"q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr"}
    KF, BK, BV, warps = _tiles(k, v)
    shape = {"K": k, "V": v, "L": chunk_size, "PREC": launch.dot_precision(dict(launch.DTYPES)[dtype])}
    return [launch.aot_spec(fn, consts, dtype, in_dtype, warps) for fn, consts in (
        (_gla_fwd_kernel, {**shape, "KF": KF, "BK": BK, "BV": BV, "RECOMPUTE": False}),
        (_gla_fwd_kernel, {**shape, "KF": KF, "BK": BK, "BV": BV, "RECOMPUTE": True}),
        (_gla_bwd_dstates_kernel, {**shape, "KF": KF, "BV": BV}),
        (_gla_bwd_chunk_kernel, {**shape, "BK": BK, "BV": BV}),
    )]


# HGRN2's head sizes (K = V = 128) and MoM's (K = V = 256), every dtype and chunk size the dispatcher takes;
# bench/kernel_resources.py adds every shipped config's shape.
AOT_KERNELS: list[dict] = [spec for kv in (128, 256) for chunk in TRITON_CHUNK_SIZES for dtype, _ in launch.DTYPES
                           for spec in aot_specs(kv, kv, chunk, dtype)]
