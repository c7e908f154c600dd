"""Depthwise causal convolution (the short conv of Mamba and Mamba-2): causal-conv1d on CUDA, else F.conv1d.

`reference.py` is the PyTorch spec (whole sequence and one decoding step), `dispatch.py` picks the path
(see mixer_kernels/backend.py).
"""

from mixer_kernels.causal_conv1d.dispatch import causal_conv1d, causal_conv1d_update

__all__ = ["causal_conv1d", "causal_conv1d_update"]
