"""Tests of the HGRN2 mixer and LM: forward == step == prefill+step, the lower bounds, and logits equal to
flash-linear-attention's `HGRN2ForCausalLM` with identical weights (an external reference), including the
Hugging Face export round trip through fla's classes.

fla's HGRN2 runs Triton kernels (fused recurrent GLA, fused RMSNorm + linear, swish, swiglu) that need a
GPU: under TRITON_INTERPRET=1 their autotuner asks for a driver and fails ("0 active drivers"). On the
CPU we therefore build fla's model with fuse_norm / fuse_swiglu / fuse_cross_entropy off and swap its
remaining Triton ops, in the namespaces where fla's layer looks them up, for their PyTorch meaning:
`fused_recurrent_gla` -> fla's own `naive_recurrent_gla`, `rms_norm_linear` -> RMSNorm then linear (eps
1e-5, its default), `swish` -> silu, `swiglu` -> silu(gate) * up. fla is imported only inside the tests:
importing it overrides transformers' mamba / mamba2 Auto entries.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from harness import assert_step_and_prefill_equal_forward, rel_err  # noqa: E402

from models.config import ModelConfig  # noqa: E402
from models.lm import CausalLM  # noqa: E402

TINY = dict(vocab_size=128, d_model=64, n_layers=3, n_heads=4, mixer="hgrn2", ffn_multiple_of=256, norm_eps=1e-6,
            hgrn2=dict(expand_ratio=16))


# fla's fused Triton norms / swiglu / loss need a GPU (see the module docstring).
UNFUSED = dict(fuse_norm=False, fuse_swiglu=False, fuse_cross_entropy=False)


def tiny_model(seed: int = 0, **overrides) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # non-trivial lower bounds and norm weights, so the mapping is really tested
        for block in model.blocks:
            block.mixer.lower_bound.normal_(std=1.0)
            block.mixer.g_norm.weight.uniform_(0.5, 1.5)
    return model


def test_forward_step_and_prefill_agree():
    model = tiny_model()
    assert_step_and_prefill_equal_forward(model, torch.randint(0, 128, (2, 21)), split=13)


def test_lower_bounds_rise_with_depth_and_start_at_zero():
    model = tiny_model()
    bounds = [block.mixer._forget_bound() for block in model.blocks]
    assert bounds[0] is None  # the first layer's forget gates are unbounded
    assert ((bounds[2] - bounds[1]) > 0).all() and (bounds[1] > 0).all() and (bounds[2] < 1).all()
    # A gradient reaches every layer's row (the softmax over depth couples them).
    model(torch.randint(0, 128, (1, 8)), labels=torch.randint(0, 128, (1, 8))).loss.backward()
    assert all(block.mixer.lower_bound.grad.abs().sum() > 0 for block in model.blocks)


def test_bad_head_count_is_a_config_error():
    with pytest.raises(ValueError, match="n_heads=4"):
        ModelConfig(**{**TINY, "n_heads": 2})


@pytest.fixture
def fla_cpu(monkeypatch):
    """fla importable and runnable on the CPU (see the module docstring)."""
    pytest.importorskip("fla", reason="flash-linear-attention not installed")
    import fla.layers.hgrn2 as fla_hgrn2
    import fla.modules.mlp as fla_mlp
    from fla.ops.gla.naive import naive_recurrent_gla

    def fused_recurrent_gla(q, k, v, gk, initial_state=None, output_final_state=False, **_):
        return naive_recurrent_gla(q, k, v, gk, initial_state, output_final_state)

    def rms_norm_linear(x, norm_weight, norm_bias, linear_weight, linear_bias, eps=1e-5, **_):
        x32 = x.float()
        y = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()).to(x.dtype)
        return F.linear(y, linear_weight, linear_bias)

    monkeypatch.setattr(fla_hgrn2, "fused_recurrent_gla", fused_recurrent_gla)
    monkeypatch.setattr(fla_hgrn2, "rms_norm_linear", rms_norm_linear)
    monkeypatch.setattr(fla_hgrn2, "swish", F.silu)
    monkeypatch.setattr(fla_mlp, "swiglu", lambda gate, up: F.silu(gate) * up)
    return fla_hgrn2


def fla_model_from(model: CausalLM):
    from fla.models import HGRN2Config, HGRN2ForCausalLM

    from models.hf import hgrn2 as hf_hgrn2

    config = HGRN2Config(**{**hf_hgrn2.to_hf_config(model.cfg).to_dict(), **UNFUSED})
    fla_model = HGRN2ForCausalLM(config).eval()
    fla_model.load_state_dict(hf_hgrn2.to_hf_state_dict(model.state_dict(), model.cfg), strict=True)
    return fla_model


def test_logits_match_fla_hgrn2(fla_cpu):
    model = tiny_model()
    fla_model = fla_model_from(model)
    ids = torch.randint(0, 128, (2, 30))
    with torch.no_grad():
        ours, theirs = model(ids).logits, fla_model(ids, use_cache=False).logits
    assert rel_err(ours, theirs) < 1e-4


def test_export_round_trip_through_fla(fla_cpu, tmp_path):
    from transformers import AutoModelForCausalLM

    from models.hf import export_hf, load_hf

    model = tiny_model(seed=1)
    export_hf(model, tmp_path / "hf")
    fla_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", **UNFUSED).eval()
    assert type(fla_model).__name__ == "HGRN2ForCausalLM"
    back = load_hf(tmp_path / "hf").eval()
    ids = torch.randint(0, 128, (2, 17))
    with torch.no_grad():
        ours = model(ids).logits
        assert rel_err(fla_model(ids, use_cache=False).logits, ours) < 1e-4
        assert torch.equal(back(ids).logits, ours)
