"""CPU stand-ins for flash-linear-attention's Triton modules that its models share (the RMSNorms and the
gated MLP's swiglu), for the tests that run fla's models as external references (tests/models/test_mom.py,
test_gated_deltanet.py). Each replaces an fla Triton entry point by its PyTorch meaning; fla is imported here
only when a test asks for it."""

import torch
import torch.nn.functional as F


def _rms(x, weight, eps):
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def patch_norms_and_mlp(monkeypatch) -> None:
    """RMSNorm.forward -> RMSNorm; FusedRMSNormGated.forward -> RMSNorm(x) * weight * silu(g);
    fla.modules.mlp.swiglu -> silu(gate) * up."""
    import fla.modules.mlp as fla_mlp
    from fla.modules import FusedRMSNormGated, RMSNorm

    def rms_norm_forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        x = x if residual is None else x + residual
        y = _rms(x, self.weight, self.eps).to(x.dtype)
        return (y, x) if prenorm else y

    def gated_norm_forward(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
        return (_rms(x, self.weight, self.eps) * F.silu(g.float())).to(x.dtype)

    monkeypatch.setattr(RMSNorm, "forward", rms_norm_forward)
    monkeypatch.setattr(FusedRMSNormGated, "forward", gated_norm_forward)
    monkeypatch.setattr(fla_mlp, "swiglu", lambda gate, up: F.silu(gate) * up)
