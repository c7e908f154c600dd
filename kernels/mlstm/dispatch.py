"""The mLSTM dispatcher: Triton chunkwise kernel on CUDA, the PyTorch reference otherwise.

The backend is chosen per call from the environment variable `MLSTM_BACKEND`:

- `auto` (default): Triton when the tensors are on CUDA and triton imports, else the reference;
- `triton`: always the Triton kernel (on CPU tensors this needs `TRITON_INTERPRET=1`, which the
  tests use); raises RuntimeError naming the fix when it cannot run;
- `reference`: always the PyTorch reference.

The choice is logged once per backend at INFO level. `mlstm_recurrent_step` and `mlstm_parallel`
always use the reference (a decoding step is memory bound and tiny; the parallel form is for tests).
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from kernels.mlstm import reference
from kernels.mlstm.reference import MLSTMState

logger = logging.getLogger(__name__)

BACKEND_ENV = "MLSTM_BACKEND"
_BACKENDS = ("auto", "triton", "reference")
_logged: set[str] = set()


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def choose_backend(q: torch.Tensor) -> str:
    """'triton' or 'reference' for inputs like q, following MLSTM_BACKEND (see module docstring)."""
    requested = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if requested not in _BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={requested!r} is not one of {', '.join(_BACKENDS)}")
    if requested == "reference":
        backend = "reference"
    elif requested == "triton":
        if not _triton_importable():
            raise RuntimeError(
                f"{BACKEND_ENV}=triton but the 'triton' package is not installed: "
                f"`pip install triton==3.7.1`, or set {BACKEND_ENV}=reference (or auto)."
            )
        if not q.is_cuda and not _interpreting():
            raise RuntimeError(
                f"{BACKEND_ENV}=triton but the tensors are on {q.device}: the Triton mLSTM kernel needs "
                f"CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported to run it on the CPU; "
                f"otherwise set {BACKEND_ENV}=reference (or auto)."
            )
        backend = "triton"
    else:
        backend = "triton" if q.is_cuda and _triton_importable() else "reference"
    if backend not in _logged:
        _logged.add(backend)
        logger.info("mlstm_chunkwise: using the %s backend (%s=%s, device %s)",
                    backend, BACKEND_ENV, requested, q.device)
    return backend


def mlstm_chunkwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i_preact: torch.Tensor,
    f_preact: torch.Tensor,
    initial_state: MLSTMState | None = None,
    chunk_size: int = 64,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, MLSTMState]:
    """Chunkwise mLSTM over a whole sequence, differentiable.

    q, k: (B, NH, T, DQK); v: (B, NH, T, DV); i_preact, f_preact: (B, NH, T) raw gate
    pre-activations; initial_state: (C (B,NH,DQK,DV), n (B,NH,DQK), m (B,NH,1)) fp32, or None.
    Returns h (B, NH, T, DV) in q's dtype and the final fp32 state (C, n, m).
    """
    if choose_backend(q) == "triton":
        from kernels.mlstm.triton import mlstm_chunkwise_triton

        return mlstm_chunkwise_triton(q, k, v, i_preact, f_preact, initial_state, chunk_size, eps)
    return reference.mlstm_chunkwise(q, k, v, i_preact, f_preact, initial_state, chunk_size, eps)


def mlstm_recurrent_step(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    i_t: torch.Tensor,
    f_t: torch.Tensor,
    state: MLSTMState | None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, MLSTMState]:
    """One decoding step. q_t, k_t (B,NH,DQK); v_t (B,NH,DV); i_t, f_t (B,NH) -> h_t (B,NH,DV), state."""
    return reference.mlstm_recurrent_step(q_t, k_t, v_t, i_t, f_t, state, eps)


def mlstm_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i_preact: torch.Tensor,
    f_preact: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Quadratic mLSTM without state, for tests: (B,NH,T,DQK) x2, (B,NH,T,DV), (B,NH,T) x2 -> h."""
    return reference.mlstm_parallel(q, k, v, i_preact, f_preact, eps)
