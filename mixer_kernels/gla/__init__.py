"""Gated linear attention with a decay per key dimension (HGRN2, MoM's GLA memories).

`reference.py` is the readable PyTorch spec (step, recurrence, chunk form), `triton.py` the chunk
kernel (forward and backward), `dispatch.py` picks one per call (mixer_kernels/backend.py).
"""

from mixer_kernels.gla.dispatch import chunk_gla, gla_step
from mixer_kernels.gla.reference import zero_state

__all__ = ["chunk_gla", "gla_step", "zero_state"]
