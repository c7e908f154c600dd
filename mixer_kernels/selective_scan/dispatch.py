"""Picks the selective-scan path (mixer_kernels/backend.py): mamba-ssm's CUDA scan and Triton step on a GPU, else PyTorch.

mamba-ssm's `selective_scan_fn` always starts from a zero state. A call with an initial state (a prompt
prefilled in pieces) still takes it: the scan is linear in the state, so the initial state's part is
added in PyTorch, h_t = exp(A * sum_{s<=t} dt_s) h_0 + (the zero-start scan), in pieces of the sequence so
the (B, D, N, T) decay never exists whole.
"""

import torch
import torch.nn.functional as F

from mixer_kernels.backend import choose, fast_function
from mixer_kernels.selective_scan import reference

MAX_D_STATE = 256  # what mamba-ssm's selective_scan_fn takes (models/config.py checks it)
# Elements of one piece of the initial-state correction's (B, D, N, piece) decay tensor.
_PIECE_ELEMENTS = 2**24


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1 scan over a sequence, differentiable. u, delta, z: (B, D, T); A: (D, N); B, C: (B, N, T);
    D, delta_bias: (D,); initial_state: (B, D, N) or None. Returns out (B, D, T), final state (B, D, N) fp32.
    """
    choice = choose("selective_scan", u)
    if not choice.fast:
        return reference.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    return scan_with(fast_function(choice), u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)


def scan_with(fn, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
    """`selective_scan` through mamba-ssm's `selective_scan_fn` (`fn`); testable with a stand-in on the CPU."""
    if initial_state is None:
        out, last_state = fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state=True)
        return out, last_state.float()
    y, last_state = fn(u, delta, A, B, C, D, None, delta_bias, delta_softplus, return_last_state=True)
    dt = delta.float() + (0.0 if delta_bias is None else delta_bias.float()[:, None])
    dt = F.softplus(dt) if delta_softplus else dt
    elapsed, A32, h0 = dt.cumsum(-1), A.float(), initial_state.float()  # elapsed: (B, D, T), sum_{s<=t} dt_s
    piece = max(1, _PIECE_ELEMENTS // h0.numel())
    y_h0 = torch.cat([
        torch.einsum("bdnt,bdn,bnt->bdt", torch.exp(elapsed[:, :, None, s:s + piece] * A32[..., None]), h0,
                     C.float()[..., s:s + piece])  # exp(A sum dt): (B, D, N, piece)
        for s in range(0, u.shape[-1], piece)], dim=-1)
    y = y.float() + y_h0
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype), last_state.float() + torch.exp(elapsed[..., -1:] * A32) * h0


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step. state (B, D, N) fp32; x, dt, z (B, D); A (D, N); B, C (B, N); D, dt_bias (D,).

    Returns y (B, D) and the new state; the caller's state is left untouched.
    """
    choice = choose("selective_state_update", x)
    if not choice.fast:
        return reference.selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    state = state.clone()  # the Triton kernel updates the state in place
    return fast_function(choice)(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus), state
