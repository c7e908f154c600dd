"""Reference SSD (Mamba-2's state space dual) in PyTorch: the step, the sequential spec, the chunked form.

Per batch, head h (of H), with a scalar decay per head and B, C shared by the H/G heads of a group:

    dt_t = clamp(softplus(dt_t + dt_bias), *dt_limit)                      (each part optional)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T                      h: (P, N) per head, fp32
    y_t  = h_t C_t + D * x_t

The op owns the dt processing (bias, softplus, clamp) and the D skip, as mamba-ssm's
`mamba_chunk_scan_combined` does, so the mixer hands over raw projections and the CUDA kernel fuses them.
Heads are group-major: head h reads group h // (H/G), as in mamba-ssm and transformers.

Shapes: x (B, T, H, P); dt (B, T, H); A (H,), negative; B, C (B, T, G, N); D, dt_bias (H,);
state (B, H, P, N).

- `ssd_step_ref`: one step (decoding); the spec of everything below;
- `ssd_sequential_ref`: that step in a loop;
- `ssd_chunked`: the chunked algorithm of the Mamba-2 paper (mamba-ssm's `ssd_minimal_discrete`), what the
  CPU runs. Within a chunk it is attention-like (C B^T masked by the decays, computed once per group, not
  per head); across chunks it passes states in order, as mamba-ssm's kernels do, so its cost stays linear
  in T (`ssd_minimal_discrete` multiplies by a chunks x chunks decay matrix instead).
"""

import torch
import torch.nn.functional as F


def process_dt(
    dt: torch.Tensor,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float] | None,
) -> torch.Tensor:
    """dt (..., H) -> clamp(softplus(dt + dt_bias), *dt_limit) in fp32."""
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit is not None:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def ssd_step_ref(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step. state (B, H, P, N); x (B, H, P); dt (B, H); B, C (B, G, N) -> y (B, H, P), new fp32 state."""
    heads_per_group = x.shape[1] // B.shape[1]
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit)  # (B, H)
    B = B.float().repeat_interleave(heads_per_group, dim=1)  # (B, H, N)
    C = C.float().repeat_interleave(heads_per_group, dim=1)
    decay = torch.exp(dt * A.float())[..., None, None]  # (B, H, 1, 1)
    state = state.float() * decay + (dt[..., None] * x.float())[..., None] * B[:, :, None, :]  # (B, H, P, N)
    y = (state @ C[..., None]).squeeze(-1)  # (B, H, P)
    if D is not None:
        y = y + D.float()[:, None] * x.float()
    return y.to(x.dtype), state


def ssd_sequential_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec: `ssd_step_ref` at every step. Returns y (B, T, H, P) in x's dtype, the final fp32 state."""
    batch, length, heads, headdim = x.shape
    state = initial_state
    if state is None:
        state = x.new_zeros(batch, heads, headdim, B.shape[-1], dtype=torch.float32)
    ys = []
    for t in range(length):
        y, state = ssd_step_ref(
            state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D, dt_bias, dt_softplus, dt_limit
        )
        ys.append(y)
    return torch.stack(ys, dim=1), state.float()


def decay_matrix(log_decay_cumsum: torch.Tensor) -> torch.Tensor:
    """(..., L) cumulative log-decays S (fp64) -> (..., L, L) fp32: exp(S_i - S_j) at [i, j], j <= i; else 0.

    The entry is the decay from step j to step i. The difference is taken in fp64, where it stays exact
    however large the sums grow (in fp32 a sum of magnitude 100 leaves the nearby differences, the
    entries that matter, with relative errors near 1e-5); mamba-ssm's `segsum` gets there with a masked
    cumsum over L x L instead, which is slower on the CPU.
    """
    length = log_decay_cumsum.shape[-1]
    # S_i + (-S_j) rather than S_i - S_j: the backward of a broadcast add is two sums, no L x L negation.
    diff = log_decay_cumsum[..., :, None] + (-log_decay_cumsum)[..., None, :]  # (..., L, L)
    causal = torch.ones(length, length, dtype=torch.bool, device=diff.device).tril()
    return torch.exp(diff.float().masked_fill(~causal, -torch.inf))


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] | None = None,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SSD by chunks of `chunk_size` steps (any T). Returns y (B, T, H, P) in x's dtype, final state fp32.

    seq_idx (B, T): the document of each token (packed documents, mamba-ssm's `seq_idx`), or None. No state
    crosses from one document to the next, as mamba-ssm's kernels do it: the decays between tokens of two
    documents are masked, a chunk's tokens write the state at its end only if they belong to its last
    document, and a state passes into the next chunk only if its document runs through that chunk. The
    initial state belongs to each row's first document, the final state is its last document's.

    Example:
        >>> x, dt = torch.randn(2, 10, 4, 8), torch.randn(2, 10, 4)
        >>> B, C = torch.randn(2, 10, 1, 16), torch.randn(2, 10, 1, 16)
        >>> y, state = ssd_chunked(x, dt, -torch.rand(4), B, C, chunk_size=4, dt_softplus=True)
        >>> y.shape, state.shape
        (torch.Size([2, 10, 4, 8]), torch.Size([2, 4, 8, 16]))
    """
    batch, length, heads, headdim = x.shape
    groups, dstate = B.shape[2:]
    per_group = heads // groups
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit)  # (B, T, H)
    # Padded steps have dt = 0: no decay and no write, so the final state is the state after step T.
    pad = -length % chunk_size
    n_chunks = (length + pad) // chunk_size

    def chunked(t: torch.Tensor) -> torch.Tensor:  # (B, T, ...) -> (B, c, l, ...)
        return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)).unflatten(1, (n_chunks, chunk_size))

    # Head h = (group g, head r within the group): B and C are used per group, never repeated per head.
    xdt = chunked(x.float() * dt[..., None]).unflatten(3, (groups, per_group))  # (b, c, l, g, r, p)
    xdt = xdt.permute(0, 3, 4, 1, 2, 5)  # (b, g, r, c, l, p)
    a = chunked(dt * A.float()).unflatten(3, (groups, per_group)).permute(0, 3, 4, 1, 2)  # (b, g, r, c, l)
    B = chunked(B.float()).permute(0, 3, 1, 2, 4)[:, :, None]  # (b, g, 1, c, l, n)
    C = chunked(C.float()).permute(0, 3, 1, 2, 4)[:, :, None]  # (b, g, 1, c, l, n)
    a_cumsum = torch.cumsum(a.double(), dim=-1)  # (b, g, r, c, l), fp64: see decay_matrix

    # 1. Outputs from inputs of the same chunk (diagonal blocks): causal "attention" C B^T with decays.
    scores = C @ B.transpose(-1, -2)  # (b, g, 1, c, l, s): shared by the heads of a group
    decays = decay_matrix(a_cumsum)  # (b, g, r, c, l, s)
    if seq_idx is not None:
        seq = torch.cat([seq_idx, seq_idx[:, -1:].expand(-1, pad)], dim=1).unflatten(1, (n_chunks, chunk_size))
        decays = decays * (seq[..., :, None] == seq[..., None, :])[:, None, None]  # seq: (b, c, l)
        at_end = seq[..., -1:]  # (b, c, 1): the document at each chunk's end
        at_start = torch.cat([seq[:, :1, :1], at_end[:, :-1]], dim=1)  # the document of the state entering
    y = (scores * decays) @ xdt  # (b, g, r, c, l, p)

    # 2. Each chunk's own contribution to the state at its end (right factor of the off-diagonal blocks).
    decay_to_end = torch.exp((a_cumsum[..., -1:] - a_cumsum).float())  # (b, g, r, c, l)
    if seq_idx is not None:
        decay_to_end = decay_to_end * (seq == at_end)[:, None, None]
    states = (xdt * decay_to_end[..., None]).transpose(-1, -2) @ B  # (b, g, r, c, p, n)

    # 3. Pass states across chunks, in order (linear in the number of chunks, as mamba-ssm's kernel does):
    # the state entering every chunk, and the final one.
    if initial_state is None:
        state = states.new_zeros(states[:, :, :, 0].shape)  # (b, g, r, p, n)
    else:
        state = initial_state.float().unflatten(1, (groups, per_group))
    chunk_decay = torch.exp(a_cumsum[..., -1].float())[..., None, None]  # (b, g, r, c, 1, 1)
    if seq_idx is not None:  # a state passes through a chunk only if its document runs to the chunk's end
        chunk_decay = chunk_decay * (at_start == at_end)[:, None, None, :, :, None]
    entering = []
    # unbind, not indexing in the loop: the backward of each index would write a full-size gradient.
    for decay, own in zip(chunk_decay.unbind(3), states.unbind(3)):
        entering.append(state)
        state = decay * state + own
    states, final_state = torch.stack(entering, dim=3), state  # (b, g, r, c, p, n), (b, g, r, p, n)

    # 4. Outputs from the state entering each chunk (left factor of the off-diagonal blocks).
    from_state = torch.exp(a_cumsum.float())  # (b, g, r, c, l)
    if seq_idx is not None:
        from_state = from_state * (seq == at_start)[:, None, None]
    y = y + (C @ states.transpose(-1, -2)) * from_state[..., None]  # (b, g, r, c, l, p)

    y = y.permute(0, 3, 4, 1, 2, 5).reshape(batch, n_chunks * chunk_size, heads, headdim)[:, :length]
    if D is not None:
        y = y + D.float()[:, None] * x.float()
    return y.to(x.dtype), final_state.flatten(1, 2)  # final: (b, h, p, n)
