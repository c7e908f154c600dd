"""RMSNorm's hand-written CPU backward (models/norms.py) against autograd through PyTorch's F.rms_norm."""

import pytest
import torch
import torch.nn.functional as F
from harness import rel_err

from models.norms import RMSNorm


# Measured: fp32 input gradients 5e-8 apart (outputs and weight gradients equal); bf16 equal after the cast back
# (the bound is one bf16 rounding).
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 5e-7), (torch.bfloat16, 4e-3)])
def test_rms_norm_gradients_equal_autograd_through_f_rms_norm(dtype, tol):
    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(3, 7, 48) * 3).to(dtype).requires_grad_()
    grad_y = torch.randn(3, 7, 48).to(dtype)
    results = []
    for fn in (lambda: F.rms_norm(x.float(), (48,), norm.weight, 1e-5).to(dtype), lambda: norm(x)):
        y = fn()
        y.backward(grad_y)
        results.append((y.detach(), x.grad.clone(), norm.weight.grad.clone()))
        x.grad, norm.weight.grad = None, None
    (ref_y, ref_x, ref_w), (got_y, got_x, got_w) = results
    assert got_y.dtype == dtype and got_x.dtype == dtype
    assert rel_err(got_y, ref_y) < tol
    assert rel_err(got_x, ref_x) < tol and rel_err(got_w, ref_w) < tol
