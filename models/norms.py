"""RMSNorm, the only normalisation the model families here use."""

import torch
import torch.nn.functional as F
from torch import nn


class _RMSNormCPU(torch.autograd.Function):
    """fp32 RMSNorm written out, forward and backward: on the CPU, autograd runs F.rms_norm as its decomposition
    (powers, means and products both ways; PyTorch has no CPU kernel for the fused backward, and its fused
    forward is the same decomposition, slower); these few in-place passes over (N, D) take half the time."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        rstd = torch.rsqrt(x.square().mean(-1, keepdim=True).add_(eps))  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        return (x * rstd).mul_(weight)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        x_hat = x * rstd
        grad_x_hat = grad_y * weight
        # d/dx of x rstd(x): rstd (g - x_hat mean(g x_hat)), g the gradient with respect to x_hat.
        mean = (grad_x_hat * x_hat).mean(-1, keepdim=True)
        grad_x = grad_x_hat.addcmul_(x_hat, mean, value=-1).mul_(rstd)
        grad_weight = (grad_y * x_hat).flatten(0, -2).sum(0)
        return grad_x, grad_weight, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the activation dtype: bf16 sums of squares lose too much. On the CPU the
        # written-out passes above; elsewhere F.rms_norm (PyTorch's fused kernels where the device has them).
        x32, weight = x.float(), self.weight.float()
        if x.device.type == "cpu":
            return _RMSNormCPU.apply(x32, weight, self.eps).to(x.dtype)
        return F.rms_norm(x32, x.shape[-1:], weight, self.eps).to(x.dtype)
