"""Selective scan of Mamba-1: mamba-ssm's `selective_scan_fn` and `selective_state_update` on CUDA.

`reference.py` holds the spec (one step; the step in a loop) and the CPU path (the same recurrence with
a hand-written backward); `dispatch.py` picks the path per call (see mixer_kernels/backend.py).
"""

from mixer_kernels.selective_scan.dispatch import selective_scan, selective_state_update

__all__ = ["selective_scan", "selective_state_update"]
