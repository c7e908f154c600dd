"""Tests of the MoM mixer and LM: routing isolation, the load-balancing loss, forward == step ==
prefill+step, and logits equal to flash-linear-attention's `MomForCausalLM` with identical weights (an
external reference), including the Hugging Face export round trip through fla's classes.

fla's MoM runs Triton kernels (RMSNorm, gated RMSNorm, short convolution, swiglu, the gated delta rule)
that need a GPU: under TRITON_INTERPRET=1 their autotuner asks for a driver and fails ("0 active
drivers"). On the CPU we build fla's model with fuse_swiglu off and swap its remaining Triton ops for
their PyTorch meaning, where fla's layer looks them up: RMSNorm / FusedRMSNormGated / ShortConvolution
`forward` (per cu_seqlens segment, as fla's eval mode does), and `fused_recurrent_gated_delta_rule` ->
fla's own `naive_recurrent_gated_delta_rule` per segment with q, k L2-normalised as its kernel does. fla
runs in eval mode and without gradients, which is where it keeps memories' convolutions apart (its
training mode convolves across memory boundaries). fla's token sort is made stable (see the fixture).
fla is imported only inside the tests.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from fla_cpu import patch_norms_and_mlp  # noqa: E402
from harness import assert_step_and_prefill_equal_forward, rel_err  # noqa: E402

from models.config import ModelConfig  # noqa: E402
from models.lm import CausalLM  # noqa: E402
from models.mixers.mom import MoMMixer, load_balancing_loss  # noqa: E402

TINY = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=2, mixer="mom", ffn_multiple_of=256, max_seq_len=64,
            mom=dict(head_dim=16, num_memories=4, top_k=2))
UNFUSED = dict(fuse_norm=False, fuse_swiglu=False, fuse_cross_entropy=False)


def tiny_model(seed: int = 0, **mom) -> CausalLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**TINY, "mom": {**TINY["mom"], **mom}})
    model = CausalLM(cfg).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.mixer.gate.weight.normal_(std=0.5)  # a decisive router, so routing varies by token
            block.mixer.o_norm.weight.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("mom", [{}, {"backend": "gla"}, {"capacity_factor": 0.5}, {"shared_memory": False}],
                         ids=["gated-delta-rule", "gla", "capacity", "no-shared"])
def test_forward_step_and_prefill_agree(mom):
    model = tiny_model(**mom)
    assert_step_and_prefill_equal_forward(model, torch.randint(0, 128, (2, 19)), split=11)


def test_memory_state_only_sees_its_tokens():
    """Perturb one token: the memories it is not routed to keep exactly their state."""
    model = tiny_model()
    mixer: MoMMixer = model.blocks[0].mixer
    torch.manual_seed(3)
    x = torch.randn(1, 24, 64)
    _, state = mixer(x)
    routed, *_ = mixer._route(x, torch.zeros(1, 4, dtype=torch.long))
    t = 10
    x2 = x.clone()
    x2[:, t] += torch.randn(64)
    routed2, *_ = mixer._route(x2, torch.zeros(1, 4, dtype=torch.long))
    _, state2 = mixer(x2)
    untouched = ~(routed[0, t] | routed2[0, t])  # memories the token goes to neither before nor after
    assert untouched.sum() >= 1
    assert torch.equal(state.memories[:, untouched], state2.memories[:, untouched])
    assert torch.equal(state.conv[:, untouched], state2.conv[:, untouched])
    changed = routed2[0, t]
    assert not torch.equal(state.memories[:, changed], state2.memories[:, changed])


def test_capacity_drops_late_tokens():
    model = tiny_model(capacity_factor=0.25)  # ceil(0.25 * 2 * 64 / 4) = 8 tokens per memory
    mixer = model.blocks[0].mixer
    _, state = mixer(torch.randn(2, 40, 64))
    assert mixer.capacity == 8 and (state.counts <= 8).all() and state.counts.sum() < 2 * 40 * 2


def test_load_balancing_loss_is_returned_and_trains_the_router():
    model = tiny_model().train()
    ids = torch.randint(0, 128, (2, 16))
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    plain = F.cross_entropy(out.logits.flatten(0, 1), ids.flatten())
    assert torch.allclose(out.loss, plain + out.aux_loss)
    # 0.01 * mean over layers of a Switch loss that is ~top_k when balanced.
    assert 0.01 * 1.0 < out.aux_loss.item() < 0.01 * 4.0
    out.loss.backward()
    assert model.blocks[0].mixer.gate.weight.grad.abs().sum() > 0


@pytest.fixture
def fla_cpu(monkeypatch):
    """fla importable and runnable on the CPU (see the module docstring)."""
    pytest.importorskip("fla", reason="flash-linear-attention not installed")
    import fla.layers.mom as fla_mom
    from fla.modules import ShortConvolution
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    def segments(x, cu_seqlens):
        bounds = [0, x.shape[1]] if cu_seqlens is None else cu_seqlens.tolist()
        return [(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    def short_conv_forward(self, x, residual=None, mask=None, cache=None, output_final_state=False,
                           cu_seqlens=None, **_):
        assert cache is None, "the CPU stand-in covers calls without a conv cache"
        ys = []
        for a, b in segments(x, cu_seqlens):  # each (memory, sequence) segment convolved on its own
            seg = F.pad(x[:, a:b].transpose(1, 2), (self.kernel_size[0] - 1, 0))
            ys.append(F.silu(F.conv1d(seg, self.weight, self.bias, groups=self.groups)).transpose(1, 2))
        return torch.cat(ys, 1), None

    def gated_delta_rule(q, k, v, g, beta, initial_state=None, output_final_state=False,
                         use_qk_l2norm_in_kernel=False, cu_seqlens=None, **_):
        assert initial_state is None and use_qk_l2norm_in_kernel
        q, k = (t / torch.sqrt(t.pow(2).sum(-1, keepdim=True) + 1e-6) for t in (q, k))
        outs = [naive_recurrent_gated_delta_rule(q[:, a:b], k[:, a:b], v[:, a:b], beta[:, a:b], g[:, a:b])[0]
                for a, b in segments(q, cu_seqlens)]
        return torch.cat(outs, 1), None

    patch_norms_and_mlp(monkeypatch)
    monkeypatch.setattr(ShortConvolution, "forward", short_conv_forward)
    monkeypatch.setattr(fla_mom, "fused_recurrent_gated_delta_rule", gated_delta_rule)
    monkeypatch.setattr(fla_mom, "chunk_gated_delta_rule", gated_delta_rule)
    # fla's `transform` orders tokens by (batch, memory) with an unstable argsort; CPU sorting then
    # shuffles tokens inside a memory out of time order (CUDA's radix sort is stable). Make it stable.
    argsort = torch.argsort
    monkeypatch.setattr(torch.Tensor, "argsort", lambda self, dim=-1, descending=False, stable=False:
                        argsort(self, dim=dim, descending=descending, stable=True))


def fla_model_from(model: CausalLM):
    from fla.models import MomConfig, MomForCausalLM

    from models.hf import mom as hf_mom

    fla_model = MomForCausalLM(MomConfig(**{**hf_mom.to_hf_config(model.cfg).to_dict(), **UNFUSED})).eval()
    fla_model.load_state_dict(hf_mom.to_hf_state_dict(model.state_dict(), model.cfg), strict=True)
    return fla_model


def test_logits_and_balancing_loss_match_fla_mom(fla_cpu):
    from fla.models.mom.modeling_mom import load_balancing_loss_func

    model = tiny_model()
    fla_model = fla_model_from(model)
    ids = torch.randint(0, 128, (2, 30))
    with torch.no_grad():
        ours = model(ids)
        theirs = fla_model(ids, use_cache=False, output_router_logits=True)
    assert rel_err(ours.logits, theirs.logits) < 1e-4
    for block, logits in zip(model.blocks, theirs.router_logits):  # fla's loss on one layer at a time
        expected = load_balancing_loss_func((logits,), 4, 2)
        assert rel_err(block.mixer.aux_loss / block.mixer.aux_loss_scale, expected) < 1e-5
        assert rel_err(load_balancing_loss(logits, 2), expected) < 1e-6


def test_export_round_trip_through_fla(fla_cpu, tmp_path):
    from transformers import AutoModelForCausalLM

    from models.hf import export_hf, load_hf

    model = tiny_model(seed=1)
    export_hf(model, tmp_path / "hf")
    fla_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", **UNFUSED).eval()
    assert type(fla_model).__name__ == "MomForCausalLM"
    back = load_hf(tmp_path / "hf").eval()
    ids = torch.randint(0, 128, (2, 17))
    with torch.no_grad():
        ours = model(ids).logits
        assert rel_err(fla_model(ids, use_cache=False).logits, ours) < 1e-4
        assert torch.equal(back(ids).logits, ours)


def test_export_refuses_what_fla_lacks():
    from models.hf import mom as hf_mom

    with pytest.raises(ValueError, match="capacity_factor"):
        hf_mom.to_hf_config(tiny_model(capacity_factor=1.0).cfg)
