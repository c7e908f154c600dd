"""Picks the selective-scan path: mamba-ssm's CUDA scan and Triton step on a GPU, else PyTorch."""

import torch

from kernels.backend import cuda_function, log_path_once
from kernels.selective_scan import reference


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
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1 scan over a sequence, differentiable. u, delta, z: (B, D, T); A: (D, N); B, C: (B, N, T);
    D, delta_bias: (D,); initial_state: (B, D, N) or None. Returns out (B, D, T), final state (B, D, N) fp32.

    backend: None (use $HP_KERNEL_BACKEND, default auto), 'auto', 'cuda' or 'reference'.
    """
    fn = cuda_function(
        "selective_scan", u, backend, "mamba_ssm.ops.selective_scan_interface", "selective_scan_fn"
    )
    if fn is not None and initial_state is not None:
        # selective_scan_fn always starts from zeros: continuing a prefilled state takes the PyTorch scan.
        log_path_once("selective_scan", "the PyTorch reference for calls with an initial state")
        fn = None
    if fn is None:
        return reference.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    out, last_state = fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state=True)
    return out, last_state.float()


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
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step. state (B, D, N) fp32; x, dt, z (B, D); A (D, N); B, C (B, N); D, dt_bias (D,).

    Returns y (B, D) and the new state; the caller's state is left untouched.
    """
    module = "mamba_ssm.ops.triton.selective_state_update"
    fn = cuda_function("selective_state_update", x, backend, module, "selective_state_update")
    if fn is None:
        return reference.selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    state = state.clone()  # the Triton kernel updates the state in place
    return fn(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus), state
