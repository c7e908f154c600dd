"""The gated delta rule (Gated DeltaNet; MoM's default memory recurrence).

`reference.py` is the readable PyTorch spec (step, recurrence, WY chunk form), `triton.py` the chunk
kernel (forward and backward), `dispatch.py` picks one per call (mixer_kernels/backend.py).
"""

from mixer_kernels.delta_rule.dispatch import chunk_gated_delta_rule, delta_rule_step
from mixer_kernels.delta_rule.reference import zero_state

__all__ = ["chunk_gated_delta_rule", "delta_rule_step", "zero_state"]
