"""Picks the SSD path: mamba-ssm's Triton kernels on a GPU (or when asked), else the chunked PyTorch form."""

import math

import torch

from kernels.backend import cuda_function, log_path_once
from kernels.ssd import reference

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
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2 scan over a sequence, differentiable (see reference.py for the maths).

    x (B, T, H, P); dt (B, T, H) raw; A (H,); B, C (B, T, G, N); D, dt_bias (H,); dt_limit (lo, hi) or
    None; initial_state (B, H, P, N) or None. Returns y (B, T, H, P) and the final fp32 state (B, H, P, N).
    backend: None (use $HP_KERNEL_BACKEND, default auto), 'auto', 'cuda' or 'reference'.
    """
    fn = cuda_function("ssd", x, backend, "mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined")
    if fn is None:
        chunk_size = chunk_size if x.is_cuda else min(chunk_size, CPU_CHUNK)
        return reference.ssd_chunked(
            x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, dt_limit, initial_state
        )
    return ssd_with(fn, x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, dt_limit, initial_state)


def ssd_with(fn, x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, dt_limit, initial_state):
    """`ssd` through mamba-ssm's `mamba_chunk_scan_combined` (`fn`); a function of its own so that the tests
    can run the call with the Triton kernel under TRITON_INTERPRET=1 on CPU tensors."""
    y, final_state = fn(
        x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, initial_states=initial_state,
        dt_softplus=dt_softplus, dt_limit=dt_limit or (0.0, math.inf), return_final_states=True,
    )
    return y, final_state.float()


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
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step. state (B, H, P, N) fp32; x (B, H, P); dt (B, H); B, C (B, G, N).

    Returns y (B, H, P) and the new state; the caller's state is left untouched.
    """
    fn = cuda_function(
        "ssd_step", x, backend, "mamba_ssm.ops.triton.selective_state_update", "selective_state_update"
    )
    if fn is not None and dt_limit is not None:
        # The Triton step kernel does not clamp dt; the forward does, so the step must too.
        log_path_once("ssd_step", "the PyTorch reference for a clamped dt (dt_limit)")
        fn = None
    if fn is None:
        return reference.ssd_step_ref(state, x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit)
    return ssd_step_with(fn, state, x, dt, A, B, C, D, dt_bias, dt_softplus)


def ssd_step_with(fn, state, x, dt, A, B, C, D, dt_bias, dt_softplus):
    """`ssd_step` through mamba-ssm's Triton `selective_state_update` (`fn`); testable like `ssd_with`."""
    headdim, dstate = x.shape[-1], B.shape[-1]
    # The kernel is written per channel; stride-0 expansions over the head dim select its per-head path.
    per_channel = dict(
        dt=dt[..., None].expand(-1, -1, headdim),
        A=A[:, None, None].expand(-1, headdim, dstate),
        D=None if D is None else D[:, None].expand(-1, headdim),
        # The kernel reads dt_bias strides to pick that path, so it always gets one.
        dt_bias=(A.new_zeros(A.shape) if dt_bias is None else dt_bias)[:, None].expand(-1, headdim),
    )
    state = state.clone()  # the Triton kernel updates the state in place
    y = fn(state, x, B=B, C=C, z=None, dt_softplus=dt_softplus, **per_channel)
    return y, state
