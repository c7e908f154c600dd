"""The GLA dispatcher: the Triton chunk kernel on CUDA, the PyTorch reference otherwise.

The backend is chosen per call from the environment variable `GLA_BACKEND`:

- `auto` (default): Triton when the tensors are on CUDA and triton imports, else the reference;
- `triton`: always the Triton kernel (on CPU tensors this needs `TRITON_INTERPRET=1`, which the tests
  use); raises RuntimeError naming the fix when it cannot run;
- `reference`: always the PyTorch chunk reference.

The choice is logged once per backend at INFO level. `gla_step` always uses the reference: a decoding
step is one rank-one update, memory bound and tiny.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from kernels.gla import reference

logger = logging.getLogger(__name__)

BACKEND_ENV = "GLA_BACKEND"
_BACKENDS = ("auto", "triton", "reference")
_logged: set[str] = set()


def choose_backend(x: torch.Tensor, env: str = BACKEND_ENV, op: str = "chunk_gla") -> str:
    """'triton' or 'reference' for inputs like x, following the environment variable `env`."""
    requested = os.environ.get(env, "auto").strip().lower() or "auto"
    if requested not in _BACKENDS:
        raise ValueError(f"{env}={requested!r} is not one of {', '.join(_BACKENDS)}")
    has_triton = importlib.util.find_spec("triton") is not None
    if requested == "reference":
        backend = "reference"
    elif requested == "triton":
        if not has_triton:
            raise RuntimeError(f"{env}=triton but the 'triton' package is not installed: "
                               f"`pip install triton==3.7.1`, or set {env}=reference (or auto).")
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(
                f"{env}=triton but the tensors are on {x.device}: the Triton {op} kernel needs CUDA tensors, "
                f"or TRITON_INTERPRET=1 set before triton is imported to run it on the CPU; "
                f"otherwise set {env}=reference (or auto)."
            )
        backend = "triton"
    else:
        backend = "triton" if x.is_cuda and has_triton else "reference"
    if (op, backend) not in _logged:
        _logged.add((op, backend))
        logger.info("%s: using the %s backend (%s=%s, device %s)", op, backend, env, requested, x.device)
    return backend


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise GLA over a whole sequence, differentiable.

    q, k, g: (B, T, H, K) with g the log decay (<= 0); v: (B, T, H, V); initial_state (B, H, K, V) fp32
    or None; scale defaults to K ** -0.5. Returns o (B, T, H, V) in v's dtype and the final fp32 state.
    chunk_size: None picks each backend's own (16 for Triton, 32 for the reference); speed only.
    """
    if choose_backend(q) == "triton":
        from kernels.gla.triton import chunk_gla_triton

        return chunk_gla_triton(q, k, v, g, scale, initial_state, chunk_size or 16)
    return reference.gla_chunk(q, k, v, g, scale, initial_state, chunk_size or 32)


def gla_step(q_t, k_t, v_t, g_t, state, scale: float | None = None):
    """One decoding step: q_t, k_t, g_t (B, H, K); v_t (B, H, V); state (B, H, K, V) -> o_t, state."""
    return reference.gla_step(q_t, k_t, v_t, g_t, state, scale)
