"""Tests of the Gated DeltaNet mixer and LM (and its 3:1 hybrid with attention) against flash-linear-attention's
`GatedDeltaNetForCausalLM` on the same weights (an external reference): logits and every parameter gradient,
forward == step == prefill + step, the Triton kernel through the mixer, the export round trip through fla's
classes, and the 1.3B config's parameter count against fla's.

fla's model runs Triton kernels that need a GPU (under TRITON_INTERPRET=1 their autotuner asks for a driver
and fails). On the CPU we build it with fuse_norm / fuse_swiglu / fuse_cross_entropy off and swap only its
Triton entry points, where fla's layers look them up, for their PyTorch meaning:
- `fla.layers.gated_deltanet.chunk_gated_delta_rule` / `fused_recurrent_gated_delta_rule` -> fla's own
  `naive_recurrent_gated_delta_rule` (from fla.ops.gated_delta_rule.naive), after what fla's kernel fuses in
  with use_gate_in_kernel / use_qk_l2norm_in_kernel / use_beta_sigmoid_in_kernel: g = -exp(A_log) *
  softplus(a + dt_bias), q and k L2-normalised (eps 1e-6), beta = sigmoid(b) (x2 with allow_neg_eigval), and
  GVA's query/key head i // (HV / H) per value head;
- `fla.layers.gated_deltanet.causal_conv1d` (the fused q|k|v short convolution) and `ShortConvolution.forward`
  -> a causal depthwise F.conv1d + SiLU;
- `FusedRMSNormGated.forward` -> RMSNorm(x) * weight * silu(g); `RMSNorm.forward` -> RMSNorm;
  `fla.modules.mlp.swiglu` -> silu(gate) * up;
- attention layers: `fla.layers.attn.flash_attn_func` -> causal SDPA (GQA by repeating K/V; flash-attn's
  window_size=(w - 1, 0) as a band mask), and
  `RotaryEmbedding.forward` -> rotate-half RoPE with fla's inverse frequencies.
fla is imported only inside the tests (importing it re-registers transformers' mamba Auto classes).
"""

import json
import os
import subprocess

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from fla_cpu import patch_norms_and_mlp  # noqa: E402
from harness import ROOT, TINY, assert_step_and_prefill_equal_forward, job_env, rel_err  # noqa: E402

from mixer_kernels import backend  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.lm import CausalLM  # noqa: E402

TINY_MODEL = yaml.safe_load((TINY / "gated_deltanet.yaml").read_text())["model"]
VARIANTS = {  # name -> the model section
    "default": TINY_MODEL,
    "gva": TINY_MODEL | {"gated_deltanet": {"head_dim": 16, "n_v_heads": 4}},  # each q/k head serves 2 value heads
    "neg-eigval-no-gate": TINY_MODEL | {"gated_deltanet": {"head_dim": 16, "allow_neg_eigval": True,
                                                           "use_output_gate": False}},
    "hybrid-3to1": yaml.safe_load((TINY / "hybrid_gdn.yaml").read_text())["model"],  # GGGA, GVA, 2 KV heads
}
# Gated DeltaNet-H1 style (GDN + sliding-window attention), with a full attention layer too (fla: two specs).
VARIANTS["hybrid-swa"] = VARIANTS["hybrid-3to1"] | {"pattern": "GWGA", "sliding_window": {"window": 8}}
UNFUSED = dict(fuse_norm=False, fuse_swiglu=False, fuse_cross_entropy=False)


def tiny_model(variant: str = "default", seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig(**VARIANTS[variant])).eval()
    with torch.no_grad():  # away from their init (ones) so that a swapped weight would show
        for block in model.blocks:
            if hasattr(block.mixer, "o_norm"):
                block.mixer.o_norm.weight.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_step_and_prefill_agree(variant):
    assert_step_and_prefill_equal_forward(tiny_model(variant), torch.randint(0, 2048, (2, 19)), split=11)


def test_triton_kernel_equals_the_reference_through_the_mixer():
    """The gated delta rule's Triton kernel (TRITON_INTERPRET=1 on the CPU) against the reference, forward and
    every gradient, inside the mixer (its chunk of 16; T = 37 is not a multiple of it)."""
    model = tiny_model("gva")
    ids = torch.randint(0, 2048, (2, 37))
    results = []
    for mode in ("reference", "fast"):
        with backend.using(overrides={"delta_rule": mode}):
            logits = model(ids).logits
            F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad()
    (ref, ref_grads), (fast, fast_grads) = results
    assert rel_err(fast, ref) < 3e-5  # fp32 on both paths; every comparison here measured <= 2.5e-6
    for name, grad in ref_grads.items():
        assert rel_err(fast_grads[name], grad) < 3e-5, name


@pytest.fixture
def fla_cpu(monkeypatch):
    """fla importable and runnable on the CPU (see the module docstring)."""
    pytest.importorskip("fla", reason="flash-linear-attention not installed")
    import fla.layers.attn as fla_attn
    import fla.layers.gated_deltanet as fla_gdn
    from fla.modules import RotaryEmbedding, ShortConvolution
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    def conv(x, weight, bias=None, activation=None, **_):  # x (B, T, C), weight (C, W)
        y = F.conv1d(F.pad(x.transpose(1, 2), (weight.shape[-1] - 1, 0)), weight[:, None], bias, groups=x.shape[-1])
        assert activation in ("silu", "swish")
        return F.silu(y).transpose(1, 2), None

    def short_conv_forward(self, x, residual=None, mask=None, cache=None, output_final_state=False,
                           cu_seqlens=None, **_):
        assert cache is None and cu_seqlens is None, "the CPU stand-in covers whole sequences without a cache"
        return conv(x, self.weight.squeeze(1), self.bias, self.activation)

    def gated_delta_rule(q, k, v, g, beta, initial_state=None, output_final_state=False, A_log=None,
                         dt_bias=None, allow_neg_eigval=False, cu_seqlens=None, use_qk_l2norm_in_kernel=False,
                         use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False, **_):
        assert initial_state is None and cu_seqlens is None
        assert use_qk_l2norm_in_kernel and use_gate_in_kernel and use_beta_sigmoid_in_kernel
        g = -A_log.float().exp() * F.softplus(g.float() + dt_bias.float())
        beta = beta.float().sigmoid() * (2 if allow_neg_eigval else 1)
        q, k = (t / torch.sqrt(t.pow(2).sum(-1, keepdim=True) + 1e-6) for t in (q, k))
        groups = v.shape[2] // q.shape[2]
        q, k = q.repeat_interleave(groups, 2), k.repeat_interleave(groups, 2)
        return naive_recurrent_gated_delta_rule(q, k, v, beta, g)[0].to(v.dtype), None

    def flash_attn_func(q, k, v, causal=True, window_size=(-1, -1), **_):  # (B, T, H, D)
        assert causal and window_size[1] in (-1, 0)
        groups = q.shape[2] // k.shape[2]
        k, v = (t.repeat_interleave(groups, 2) for t in (k, v))
        i, j = torch.arange(q.shape[1])[:, None], torch.arange(k.shape[1])[None, :]
        mask = (j <= i) & ((i - j <= window_size[0]) if window_size[0] >= 0 else True)  # flash-attn's window
        o = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask)
        return o.transpose(1, 2)

    def rotary_forward(self, q, k, seqlen_offset=0, cu_seqlens=None, max_seqlen=None, **_):
        assert cu_seqlens is None and not self.interleaved
        pos = torch.arange(q.shape[1], dtype=torch.float32) + seqlen_offset
        angles = torch.outer(pos, self._compute_inv_freq())
        cos, sin = (torch.cat([f(angles)] * 2, -1)[None, :, None] for f in (torch.cos, torch.sin))

        def rotate(x):
            x1, x2 = x.float().chunk(2, -1)
            return (x.float() * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)
        return rotate(q), rotate(k)

    patch_norms_and_mlp(monkeypatch)
    monkeypatch.setattr(ShortConvolution, "forward", short_conv_forward)
    monkeypatch.setattr(fla_gdn, "causal_conv1d", conv)
    monkeypatch.setattr(fla_gdn, "chunk_gated_delta_rule", gated_delta_rule)
    monkeypatch.setattr(fla_gdn, "fused_recurrent_gated_delta_rule", gated_delta_rule)
    monkeypatch.setattr(fla_attn, "flash_attn_func", flash_attn_func)
    monkeypatch.setattr(RotaryEmbedding, "forward", rotary_forward)


def fla_model_from(model: CausalLM):
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    from models.hf import gated_deltanet as hf_gdn

    fla_model = GatedDeltaNetForCausalLM(GatedDeltaNetConfig(**{**hf_gdn.to_hf_config(model.cfg).to_dict(),
                                                                  **UNFUSED}))
    fla_model.load_state_dict(hf_gdn.to_hf_state_dict(model.state_dict(), model.cfg), strict=True)
    return fla_model


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_and_every_gradient_match_fla(fla_cpu, variant):
    """fp32, training mode on both sides (fla's chunk path, our reference): logits and every parameter
    gradient of the same loss within 3e-5 (the issue asks 1e-4; measured <= 2.5e-6, fp32 rounding)."""
    model = tiny_model(variant).train()
    fla_model = fla_model_from(model).train()
    ids = torch.randint(0, 2048, (2, 30))
    ours = model(ids).logits
    theirs = fla_model(ids, use_cache=False).logits
    assert rel_err(ours, theirs) < 3e-5
    for logits in (ours, theirs):
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    fla_params = dict(fla_model.named_parameters())
    from models.hf import gated_deltanet as hf_gdn

    names = hf_gdn.to_hf_state_dict(dict(model.named_parameters()), model.cfg)
    assert names.keys() == fla_params.keys()
    for fla_name, param in names.items():
        assert rel_err(param.grad, fla_params[fla_name].grad) < 3e-5, fla_name


@pytest.mark.parametrize("variant", ["gva", "hybrid-3to1", "hybrid-swa"])
def test_export_round_trip_through_fla(fla_cpu, variant, tmp_path):
    import fla  # noqa: F401  registers GatedDeltaNetForCausalLM with the Auto classes
    from transformers import AutoModelForCausalLM

    from models.hf import export_hf, load_hf

    model = tiny_model(variant, seed=1)
    export_hf(model, tmp_path / "hf")
    fla_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", **UNFUSED).eval()
    assert type(fla_model).__name__ == "GatedDeltaNetForCausalLM"
    back = load_hf(tmp_path / "hf").eval()
    assert back.cfg.layer_mixers() == model.cfg.layer_mixers()
    ids = torch.randint(0, 2048, (2, 17))
    with torch.no_grad():
        ours = model(ids).logits
        assert rel_err(fla_model(ids, use_cache=False).logits, ours) < 3e-5
        assert torch.equal(back(ids).logits, ours)


def test_export_refuses_what_fla_lacks():
    from models.hf import export_hf
    from models.hf import gated_deltanet as hf_gdn

    mixed = ModelConfig(**TINY_MODEL | {"pattern": "GGm", "n_layers": 3, "mamba2": {"headdim": 16, "d_state": 16}})
    with pytest.raises(ValueError, match="no Hugging Face export for layers"):
        export_hf(CausalLM(mixed), "/nonexistent")
    with pytest.raises(ValueError, match="pattern letters G, A and W"):
        hf_gdn.to_hf_config(mixed)
    with pytest.raises(ValueError, match="logit soft cap"):
        hf_gdn.to_hf_config(ModelConfig(**TINY_MODEL | {"logits_soft_cap": 30.0}))


def test_dry_run_of_the_1_3b_config_counts_fla_s_parameters(fla_cpu):
    """`--dry-run` of configs/gated_deltanet_1.3b.yaml against fla's GatedDeltaNetForCausalLM built from
    configs the same shapes on the meta device (fla's own published 1B config, flame's gated_deltanet_1B.json,
    at our vocabulary)."""
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    cmd = [os.sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config",
           str(ROOT / "configs" / "gated_deltanet_1.3b.yaml"), "--dry-run"]
    proc = subprocess.run(cmd, env=job_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.JSONDecoder().raw_decode(proc.stdout)[0]
    m = report["config"]["model"]
    fla_config = GatedDeltaNetConfig(hidden_size=2048, num_heads=6, head_dim=256, expand_v=2, num_hidden_layers=21,
                                     hidden_ratio=4, intermediate_size=None, conv_size=4, vocab_size=m["vocab_size"],
                                     tie_word_embeddings=False, **UNFUSED)
    with torch.device("meta"):
        expected = sum(p.numel() for p in GatedDeltaNetForCausalLM(fla_config).parameters())
    assert report["dry_run"]["parameters"] == expected
    assert 1.2e9 < expected < 1.5e9


def test_inconsistent_heads_are_a_clear_config_error():
    with pytest.raises(ValueError, match="gated_deltanet.n_v_heads=3 is not a multiple of the query/key heads 2"):
        ModelConfig(**TINY_MODEL | {"gated_deltanet": {"head_dim": 16, "n_v_heads": 3}})
    with pytest.raises(ValueError, match="gated_deltanet.head_dim \\* expand_v = 24.5 is not an integer"):
        ModelConfig(**TINY_MODEL | {"gated_deltanet": {"head_dim": 16, "expand_v": 1.53125}})
