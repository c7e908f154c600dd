"""SSD, the scan of Mamba-2: mamba-ssm's `mamba_chunk_scan_combined` on CUDA, chunked PyTorch otherwise.

`reference.py` holds the spec (one step; the step in a loop) and the chunked form the CPU runs;
`dispatch.py` picks the path per call (see mixer_kernels/backend.py).
"""

from mixer_kernels.ssd.dispatch import ssd, ssd_step

__all__ = ["ssd", "ssd_step"]
