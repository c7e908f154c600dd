"""Fixtures of the kernel tests."""

import pytest
import torch


@pytest.fixture
def nan_buffers(monkeypatch):
    """Every buffer the Triton launchers allocate starts as NaN, so a read of an unwritten element shows."""
    from mixer_kernels import triton_launch

    monkeypatch.setattr(triton_launch, "alloc", lambda *shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))
