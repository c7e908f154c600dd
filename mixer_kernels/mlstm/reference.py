"""mLSTM (xLSTM-7B matrix memory) in plain PyTorch: the readable spec of the op.

Owns three forms of the same cell, which must agree numerically:

- `mlstm_recurrent_step` / `mlstm_recurrent`: one token at a time (generation, and the definition);
- `mlstm_chunkwise`: chunks of `chunk_size` tokens in parallel, a recurrence between chunks
  (training and prefill on the CPU, and the spec the Triton kernel is tested against);
- `mlstm_parallel`: the quadratic form, no state (tests only).

The math is exactly NX-AI's `mlstm_kernels` (also transformers' `xLSTMForCausalLM` natives). With
`q` already scaled by DQK**-0.5, per head and per step t (gates are raw pre-activations):

    logf_t = logsigmoid(f_t)
    m_t    = max(logf_t + m_{t-1}, i_t)                          # max-state stabiliser
    C_t    = exp(logf_t + m_{t-1} - m_t) C_{t-1} + exp(i_t - m_t) k_t v_t^T
    n_t    = exp(logf_t + m_{t-1} - m_t) n_{t-1} + exp(i_t - m_t) k_t
    h_t    = (q_t^T C_t) / (max(|q_t^T n_t|, exp(-m_t)) + eps)

C and n are stored divided by exp(m), so they stay finite; m starts at 0 with C = n = 0.
State contract: `state = (C, n, m)` with C (B, NH, DQK, DV), n (B, NH, DQK), m (B, NH, 1), always
fp32. Everything is computed in fp32; h is returned in the dtype of q.

`mlstm_parallel` follows `mlstm_kernels.torch.parallel.native` and has no initial state: its
stabiliser is the row max of the gate matrix without the `m_0 = 0` term. The two stabilisers only
change the `eps` term, by at most eps relative (the recurrent m can only exceed the parallel one
where it equals the cumulative log forget gate, which is <= 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixer_kernels.varlen import packed_call_heads_first

MLSTMState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # C (B,NH,DQK,DV), n (B,NH,DQK), m (B,NH,1)


def zero_state(
    batch: int, heads: int, dqk: int, dv: int, device: torch.device | str | None = None
) -> MLSTMState:
    """The initial state (C, n, m) = 0, in fp32."""
    return (
        torch.zeros(batch, heads, dqk, dv, dtype=torch.float32, device=device),
        torch.zeros(batch, heads, dqk, dtype=torch.float32, device=device),
        torch.zeros(batch, heads, 1, dtype=torch.float32, device=device),
    )


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i_preact: torch.Tensor,
    f_preact: torch.Tensor,
    initial_state: MLSTMState | None = None,
) -> None:
    """Raise ValueError unless the shapes follow the sequence contract of the mLSTM ops."""
    if q.dim() != 4:
        raise ValueError(f"q must be (B, NH, T, DQK), got shape {tuple(q.shape)}")
    B, NH, T, DQK = q.shape
    if T == 0:
        raise ValueError("mLSTM needs at least one token (T >= 1)")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != (B, NH, T):
        raise ValueError(f"v must be (B, NH, T, DV) = ({B}, {NH}, {T}, DV), got {tuple(v.shape)}")
    for name, gate in (("i_preact", i_preact), ("f_preact", f_preact)):
        if gate.shape != (B, NH, T):
            raise ValueError(f"{name} must be (B, NH, T) = ({B}, {NH}, {T}), got {tuple(gate.shape)}")
    if initial_state is not None:
        check_state(initial_state, B, NH, DQK, v.shape[-1])


def check_state(state: MLSTMState, B: int, NH: int, DQK: int, DV: int) -> None:
    """Raise ValueError unless state = (C, n, m) has the shapes (B,NH,DQK,DV), (B,NH,DQK), (B,NH,1)."""
    if not isinstance(state, (tuple, list)) or len(state) != 3:
        raise ValueError("state must be a tuple (C, n, m)")
    expected = ((B, NH, DQK, DV), (B, NH, DQK), (B, NH, 1))
    for name, tensor, shape in zip("Cnm", state, expected):
        if tuple(tensor.shape) != shape:
            raise ValueError(f"state {name} must have shape {shape}, got {tuple(tensor.shape)}")


def mlstm_recurrent_step(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    i_t: torch.Tensor,
    f_t: torch.Tensor,
    state: MLSTMState | None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, MLSTMState]:
    """One mLSTM step.

    q_t, k_t: (B, NH, DQK); v_t: (B, NH, DV); i_t, f_t: (B, NH) gate pre-activations;
    state: (C, n, m) or None for the zero state. Returns h_t (B, NH, DV) in q_t's dtype and the new
    fp32 state.
    """
    if q_t.dim() != 3 or k_t.shape != q_t.shape:
        raise ValueError(f"q_t, k_t must both be (B, NH, DQK), got {tuple(q_t.shape)}, {tuple(k_t.shape)}")
    B, NH, DQK = q_t.shape
    if v_t.dim() != 3 or v_t.shape[:2] != (B, NH):
        raise ValueError(f"v_t must be (B, NH, DV) = ({B}, {NH}, DV), got {tuple(v_t.shape)}")
    if i_t.shape != (B, NH) or f_t.shape != (B, NH):
        raise ValueError(f"i_t, f_t must be (B, NH) = ({B}, {NH}), got {tuple(i_t.shape)}, {tuple(f_t.shape)}")
    DV = v_t.shape[-1]
    if state is None:
        state = zero_state(B, NH, DQK, DV, q_t.device)
    check_state(state, B, NH, DQK, DV)
    C, n, m = (s.float() for s in state)  # (B,NH,DQK,DV), (B,NH,DQK), (B,NH,1)

    q = q_t.float() * DQK**-0.5  # (B, NH, DQK)
    k, v = k_t.float(), v_t.float()
    i, logf = i_t.float()[..., None], F.logsigmoid(f_t.float())[..., None]  # (B, NH, 1)

    m_new = torch.maximum(logf + m, i)  # (B, NH, 1)
    f_act = torch.exp(logf + m - m_new)  # (B, NH, 1)
    i_act = torch.exp(i - m_new)  # (B, NH, 1)
    C_new = f_act[..., None] * C + i_act[..., None] * (k[..., :, None] * v[..., None, :])  # (B,NH,DQK,DV)
    n_new = f_act * n + i_act * k  # (B, NH, DQK)

    num = (q[..., None, :] @ C_new).squeeze(-2)  # (B, NH, DV)
    qn = (q * n_new).sum(-1, keepdim=True)  # (B, NH, 1)
    den = torch.maximum(qn.abs(), torch.exp(-m_new)) + eps  # (B, NH, 1)
    return (num / den).to(q_t.dtype), (C_new, n_new, m_new)


def mlstm_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i_preact: torch.Tensor,
    f_preact: torch.Tensor,
    initial_state: MLSTMState | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, MLSTMState]:
    """`mlstm_recurrent_step` looped over T. Shapes as `mlstm_chunkwise`."""
    check_inputs(q, k, v, i_preact, f_preact, initial_state)
    state = initial_state
    hs = []
    for t in range(q.shape[2]):
        h_t, state = mlstm_recurrent_step(
            q[:, :, t], k[:, :, t], v[:, :, t], i_preact[:, :, t], f_preact[:, :, t], state, eps
        )
        hs.append(h_t)
    return torch.stack(hs, dim=2), state  # h (B, NH, T, DV)


def mlstm_chunkwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i_preact: torch.Tensor,
    f_preact: torch.Tensor,
    initial_state: MLSTMState | None = None,
    chunk_size: int = 64,
    eps: float = 1e-6,
    stabilizer_grad: bool = True,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, MLSTMState]:
    """Chunkwise mLSTM: quadratic inside a chunk, recurrent over chunk states.

    cu_seqlens: packed documents (B = 1, the flattened tokens on the time axis), each run as a fresh
    sequence, stabiliser included (mixer_kernels/varlen.py: after a reset slot C = n = 0 and m = 0 exactly); then
    no final state (None).

    q, k: (B, NH, T, DQK); v: (B, NH, T, DV); i_preact, f_preact: (B, NH, T);
    initial_state: (C, n, m) or None. Returns h (B, NH, T, DV) in q's dtype and the final fp32 state.
    Any T works: the last chunk is simply shorter. Differentiable by autograd; `stabilizer_grad=False`
    treats the max-state stabilisers as constants, the backward of the Triton kernel and of mlstm_kernels
    (they differ from the exact gradient only where the floor exp(-m) of the normaliser is active, and by
    O(eps) terms).
    """
    check_inputs(q, k, v, i_preact, f_preact, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if cu_seqlens is not None:
        return packed_call_heads_first(
            lambda _, q, k, v, f, i: mlstm_chunkwise(q, k, v, i, f, None, chunk_size, eps, stabilizer_grad)[0],
            cu_seqlens, chunk_size, initial_state, q, k, v, f_preact, i_preact)
    if initial_state is None:
        initial_state = zero_state(q.shape[0], q.shape[1], q.shape[3], v.shape[3], q.device)
    T, whole = q.shape[2], q.shape[2] // chunk_size * chunk_size
    if whole in (0, T):  # one call over equal chunks: all of them, or a single shorter one
        h, state = _equal_chunks(q, k, v, i_preact, f_preact, initial_state, min(chunk_size, T), eps, stabilizer_grad)
        return h.to(q.dtype), state
    # The shorter last chunk runs from the state the equal chunks end in.
    head, state = _equal_chunks(*(z[:, :, :whole] for z in (q, k, v, i_preact, f_preact)), initial_state,
                                chunk_size, eps, stabilizer_grad)
    tail, state = _equal_chunks(*(z[:, :, whole:] for z in (q, k, v, i_preact, f_preact)), state,
                                T - whole, eps, stabilizer_grad)
    return torch.cat([head, tail], dim=2).to(q.dtype), state


def _equal_chunks(q, k, v, i_preact, f_preact, state: MLSTMState, L: int, eps: float, stabilizer_grad: bool):
    """`mlstm_chunkwise` for T a multiple of L, every chunk at once: only the chunk-start states run in a
    loop over chunks (a few elementwise ops each), the intra-chunk work is batched over all chunks. A loop
    doing all of a chunk's work made the time per token grow with the number of chunks."""
    B, NH, T, DQK = q.shape
    NC = T // L
    C0, n0, m = (s.float() for s in state)  # (B,NH,DQK,DV), (B,NH,DQK), (B,NH,1)
    qc = q.float().unflatten(2, (NC, L)) * DQK**-0.5  # (B, NH, NC, L, DQK)
    kc = k.float().unflatten(2, (NC, L))  # (B, NH, NC, L, DQK)
    # v with a column of ones: the same matmuls then carry the normaliser n beside C (its last column).
    v1 = F.pad(v.float(), (0, 1), value=1.0).unflatten(2, (NC, L))  # (B, NH, NC, L, DV + 1)
    ic = i_preact.float().unflatten(2, (NC, L))  # (B, NH, NC, L)
    b = F.logsigmoid(f_preact.float()).unflatten(2, (NC, L)).cumsum(-1)  # log forget from chunk start to t

    # Chunk-start states. Chunk c adds its tokens with weights exp(a_l) = exp(g - b_l + i_l) (g: the whole
    # chunk's log forget), stabilised locally by m_local; the recurrence restabilises with m_next.
    g = b[..., -1]  # (B, NH, NC)
    a = g[..., None] - b + ic  # (B, NH, NC, L)
    m_local = a.amax(-1)  # (B, NH, NC)
    update = (kc * torch.exp(a - m_local[..., None])[..., None]).transpose(-2, -1) @ v1  # (B,NH,NC,DQK,DV+1)
    m_start = []  # m at each chunk start, then the final one
    m = m.squeeze(-1)  # (B, NH)
    # unbind, not indexing in the loops: the backward of each index would write a full-size gradient.
    for g_c, m_local_c in zip(g.unbind(-1), m_local.unbind(-1)):
        m_start.append(m)
        m = torch.maximum(g_c + m, m_local_c)
        m = m if stabilizer_grad else m.detach()
    m_start = torch.stack(m_start + [m], dim=-1)  # (B, NH, NC + 1)
    decay = torch.exp(g + m_start[..., :-1] - m_start[..., 1:])[..., None, None]  # (B, NH, NC, 1, 1)
    gain = torch.exp(m_local - m_start[..., 1:])[..., None, None]  # (B, NH, NC, 1, 1)
    Cn = torch.cat([C0, n0[..., None]], dim=-1)  # (B, NH, DQK, DV + 1)
    states = []
    for decay_c, gain_c, update_c in zip(decay.unbind(2), gain.unbind(2), update.unbind(2)):
        states.append(Cn)
        Cn = torch.addcmul(decay_c * Cn, gain_c, update_c)
    start = torch.stack(states, dim=2)  # (B, NH, NC, DQK, DV + 1)

    # Outputs. Row j mixes the chunk-start state (weight exp(b_j + m)) with tokens l <= j of the chunk
    # (weight exp(b_j - b_l + i_l)); each row is stabilised by its own max m_comb. The forms are picked for
    # the backward autograd derives: an added -inf mask (masked_fill costs a copy and a pass each way), max
    # with indices (amax's backward compares and divides over all of log_d), split (slices each zero-fill).
    future = torch.full((L, L), float("-inf"), device=q.device).triu_(1)  # 0 on and below the diagonal
    log_d = (b[..., :, None] - (b - ic)[..., None, :]).add_(future)  # (B, NH, NC, L, L)
    m_inter = b + m_start[..., :-1, None]  # (B, NH, NC, L)
    m_comb = torch.maximum(m_inter, log_d.max(-1).values)  # (B, NH, NC, L)
    m_comb = m_comb if stabilizer_grad else m_comb.detach()
    s = (qc @ kc.transpose(-2, -1)) * torch.exp(log_d - m_comb[..., None])  # (B, NH, NC, L, L)
    num = torch.exp(m_inter - m_comb)[..., None] * (qc @ start) + s @ v1  # (B, NH, NC, L, DV + 1)
    num_c, num_n = num.split([num.shape[-1] - 1, 1], dim=-1)
    den = torch.maximum(num_n.abs(), torch.exp(-m_comb)[..., None]) + eps  # (B, NH, NC, L, 1)
    h = (num_c / den).flatten(2, 3)  # (B, NH, T, DV)
    return h, (Cn[..., :-1], Cn[..., -1], m[..., None])


def mlstm_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i_preact: torch.Tensor,
    f_preact: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Quadratic (attention-like) mLSTM with zero initial state; for tests only.

    q, k: (B, NH, T, DQK); v: (B, NH, T, DV); i_preact, f_preact: (B, NH, T). Returns h (B, NH, T, DV).
    """
    check_inputs(q, k, v, i_preact, f_preact)
    B, NH, T, DQK = q.shape
    b = F.logsigmoid(f_preact.float()).cumsum(-1)  # (B, NH, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    log_d = (b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf"))
    log_d = log_d + i_preact.float()[..., None, :]  # (B, NH, T, T)
    m = log_d.amax(-1, keepdim=True)  # (B, NH, T, 1)
    s = (q.float() @ k.float().transpose(-2, -1)) * DQK**-0.5 * torch.exp(log_d - m)  # (B, NH, T, T)
    den = torch.maximum(s.sum(-1, keepdim=True).abs(), torch.exp(-m)) + eps  # (B, NH, T, 1)
    return ((s / den) @ v.float()).to(q.dtype)  # (B, NH, T, DV)
