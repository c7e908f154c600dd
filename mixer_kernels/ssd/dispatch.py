"""Picks the SSD path (mixer_kernels/backend.py): mamba-ssm's Triton kernels on a GPU, else the chunked PyTorch form.

Two gaps of mamba-ssm 2.3.2 are closed here, so the fast path runs every call the mixer makes:
- `mamba_chunk_scan_combined` returns the final state in C's dtype (bf16 in training), so a prefill would
  hand a rounded state to decoding; releases after 2.3.2 take `state_dtype` and get fp32, earlier ones get
  the final state recomputed in fp32 from the same inputs (one (P x T) @ (T x N) product per head) when
  no gradient is being recorded: a prefill; in training the state is dropped, and recomputing it under
  autograd would keep its inputs alive in fp32 for nothing;
- its `selective_state_update` has no dt clamp, so `ssd_step` hands it dt already processed
  (bias, softplus, clamp) in fp32.
"""

import functools
import inspect

import torch

from mixer_kernels.backend import choose, fast_function
from mixer_kernels.ssd import reference

# The chunked PyTorch form does O(chunk) work per token in its chunk x chunk blocks and O(1) per token to
# pass states between chunks: on the CPU, chunks of 64 train faster than the 256 that suit mamba-ssm's
# GPU kernels (the result is the same for any chunk size).
CPU_CHUNK = 64


def ssd(
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
    """Mamba-2 scan over a sequence, differentiable (see reference.py for the maths).

    x (B, T, H, P); dt (B, T, H) raw; A (H,); B, C (B, T, G, N); D, dt_bias (H,); dt_limit (lo, hi) or
    None; initial_state (B, H, P, N) or None; seq_idx (B, T) int32 document index per token (packed
    documents: no state crosses a boundary) or None. Returns y (B, T, H, P) and the final fp32 state
    (B, H, P, N), of each row's last document under seq_idx.
    """
    choice = choose("ssd", x)
    if not choice.fast:
        chunk_size = chunk_size if x.is_cuda else min(chunk_size, CPU_CHUNK)
        return reference.ssd_chunked(
            x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, dt_limit, initial_state, seq_idx
        )
    return ssd_with(fast_function(choice), x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, dt_limit,
                    initial_state, seq_idx)


@functools.cache
def _takes_state_dtype(fn) -> bool:
    return "state_dtype" in inspect.signature(fn).parameters


def ssd_with(fn, x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, dt_limit, initial_state, seq_idx=None):
    """`ssd` through mamba-ssm's `mamba_chunk_scan_combined` (`fn`); a function of its own so that the tests
    can run the call with the Triton kernel under TRITON_INTERPRET=1 on CPU tensors."""
    kwargs = dict(D=D, dt_bias=dt_bias, initial_states=initial_state, dt_softplus=dt_softplus,
                  dt_limit=dt_limit or (0.0, float("inf")), return_final_states=True,
                  seq_idx=None if seq_idx is None else seq_idx.to(torch.int32).contiguous())
    if _takes_state_dtype(fn):
        y, final_state = fn(x, dt, A, B, C, chunk_size, **kwargs, state_dtype=torch.float32)
        return y, final_state.float()
    y, final_state = fn(x, dt, A, B, C, chunk_size, **kwargs)  # its final state is rounded to C's dtype
    if torch.is_grad_enabled() or seq_idx is not None:  # (a packed prefill runs per document, without seq_idx)
        return y, final_state.float()
    return y, final_state_fp32(x, reference.process_dt(dt, dt_bias, dt_softplus, dt_limit), A, B, initial_state)


def final_state_fp32(x, dt, A, B, initial_state) -> torch.Tensor:
    """The state after the last token, in fp32: h_T = exp(A sum_t dt_t) h_0 + sum_t exp(A sum_{s>t} dt_s) dt_t
    x_t B_t^T. x (B, T, H, P); dt (B, T, H) processed; B (B, T, G, N); initial_state (B, H, P, N) or None."""
    b, t, h, p = x.shape
    g = B.shape[2]
    log_decay = dt * A.float()  # (B, T, H)
    # The decay from t to the end, sum_{s>t}: a suffix sum, not total - prefix (that cancels digits at long T).
    after = log_decay.flip(1).cumsum(1).flip(1) - log_decay
    weight = torch.exp(after) * dt  # (B, T, H)
    total = after[:, 0] + log_decay[:, 0]  # (B, H)
    xw = (x.float() * weight[..., None]).unflatten(2, (g, h // g))  # (B, T, G, H/G, P)
    state = torch.einsum("btgjp,btgn->bgjpn", xw, B.float()).flatten(1, 2)  # (B, H, P, N)
    if initial_state is not None:
        state = state + total.exp()[..., None, None] * initial_state.float()
    return state


def ssd_step(
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
    """One decoding step. state (B, H, P, N) fp32; x (B, H, P); dt (B, H); B, C (B, G, N).

    Returns y (B, H, P) and the new state; the caller's state is left untouched.
    """
    choice = choose("ssd_step", x)
    if not choice.fast:
        return reference.ssd_step_ref(state, x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit)
    return ssd_step_with(fast_function(choice), state, x, reference.process_dt(dt, dt_bias, dt_softplus, dt_limit),
                         A, B, C, D)


def ssd_step_with(fn, state, x, dt, A, B, C, D):
    """`ssd_step` through mamba-ssm's Triton `selective_state_update` (`fn`), dt already processed (fp32);
    testable like `ssd_with`."""
    headdim, dstate = x.shape[-1], B.shape[-1]
    # The kernel is written per channel; stride-0 expansions over the head dim select its per-head path.
    per_channel = dict(
        dt=dt[..., None].expand(-1, -1, headdim),
        A=A[:, None, None].expand(-1, headdim, dstate),
        D=None if D is None else D[:, None].expand(-1, headdim),
        # The kernel reads dt_bias strides to pick that path, so it always gets one: zero, dt is final.
        dt_bias=A.new_zeros(A.shape)[:, None].expand(-1, headdim),
    )
    state = state.clone()  # the Triton kernel updates the state in place
    y = fn(state, x, B=B, C=C, z=None, dt_softplus=False, **per_channel)
    return y, state
