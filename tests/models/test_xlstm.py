"""The mLSTM mixer and the xLSTM LM: forms agree, and the model equals transformers' and NX-AI's xLSTM.

References this project did not write: transformers' native `xLSTMForCausalLM` (its own PyTorch
kernels), NX-AI's `xLSTMLarge` (package `xlstm`, skipped when not installed) and the default
`xLSTMConfig` (NX-AI's xLSTM-7B shape). All in fp32 on the CPU.
"""

from pathlib import Path

import pytest
import torch
import yaml
from transformers import xLSTMConfig, xLSTMForCausalLM

import models.mixers.mlstm as mlstm_module
from mixer_kernels.mlstm import mlstm_parallel
from models import CausalLM, ModelConfig, count_parameters
from models.hf import xlstm as hf_xlstm

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative RMS error of x against ref."""
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def tiny_cfg(**overrides) -> ModelConfig:
    raw = yaml.safe_load((CONFIGS / "tiny" / "xlstm.yaml").read_text())["model"]
    return ModelConfig(**{**raw, **overrides})


def perturbed_model(cfg: ModelConfig, seed: int = 0) -> CausalLM:
    """A model whose gates depend on the input (at init their weights are 0) and whose norms are not 1."""
    torch.manual_seed(seed)
    model = CausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if "gate.bias" in name else 0.05))
    return model


def hf_twin(model: CausalLM) -> xLSTMForCausalLM:
    """transformers' xLSTM holding our weights, on its native PyTorch kernels."""
    hf_config = hf_xlstm.to_hf_config(model.cfg)
    assert (hf_config.chunkwise_kernel, hf_config.sequence_kernel, hf_config.step_kernel) == (
        "chunkwise--native_autograd", "native_sequence__native", "native")
    hf = xLSTMForCausalLM(hf_config)
    hf.load_state_dict(hf_xlstm.to_hf_state_dict(model.state_dict(), model.cfg), strict=True)
    return hf.train(model.training)


def test_7b_config_has_exactly_transformers_default_parameter_count():
    cfg = ModelConfig(**yaml.safe_load((CONFIGS / "xlstm_7b.yaml").read_text())["model"])
    with torch.device("meta"):
        reference = xLSTMForCausalLM(xLSTMConfig())
    assert count_parameters(cfg) == sum(p.numel() for p in reference.parameters()) == 6_865_424_896
    # and the config map gives back transformers' defaults (NX-AI's xLSTM-7B) field by field
    ours, default = hf_xlstm.to_hf_config(cfg).to_dict(), xLSTMConfig().to_dict()
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "qk_dim_factor", "v_dim_factor",
                "ffn_proj_factor", "ffn_round_up_to_multiple_of", "gate_soft_cap", "output_logit_soft_cap",
                "norm_eps", "eps", "chunk_size", "tie_word_embeddings", "use_bias", "weight_mode"):
        assert ours[key] == default[key], key


def test_init_follows_nx_ai():
    mixer = CausalLM(tiny_cfg(n_heads=4)).blocks[0].mixer
    assert torch.equal(mixer.i_gate.bias, torch.full((4,), -10.0))
    assert torch.allclose(mixer.f_gate.bias, torch.tensor([3.0, 4.0, 5.0, 6.0]))
    assert not mixer.i_gate.weight.any() and not mixer.f_gate.weight.any()
    assert torch.equal(mixer.init_state(2)[2], torch.zeros(2, 4, 1))


def test_rejects_heads_that_do_not_divide_qk_width():
    with pytest.raises(ValueError, match="qk_dim_factor"):
        CausalLM(tiny_cfg(mlstm={"qk_dim_factor": 0.3}))  # 128 * 0.3 = 38.4


@pytest.mark.parametrize("T", [1, 37, 64, 130])
def test_chunkwise_parallel_and_step_agree(T, monkeypatch):
    """The mixer through its chunkwise kernel, the quadratic form, and token by token."""
    torch.manual_seed(T)
    mixer = perturbed_model(tiny_cfg(mlstm={"chunk_size": 16})).blocks[0].mixer
    x = torch.randn(2, T, 128, requires_grad=True)

    y_chunk, state = mixer(x)
    (grad_chunk,) = torch.autograd.grad(y_chunk.square().sum(), x)

    step_state, ys = mixer.init_state(2), []
    for t in range(T):
        y_t, step_state = mixer.step(x[:, t], step_state)
        ys.append(y_t)
    y_step = torch.stack(ys, dim=1)
    assert rel_err(y_chunk, y_step) < 1e-5
    for s_chunk, s_step in zip(state, step_state, strict=True):
        assert rel_err(s_chunk, s_step) < 1e-5

    def parallel(q, k, v, i, f, initial_state, chunk_size, eps, cu_seqlens=None):
        assert cu_seqlens is None
        assert initial_state is None
        return mlstm_parallel(q, k, v, i, f, eps), None

    monkeypatch.setattr(mlstm_module, "mlstm_chunkwise", parallel)
    y_parallel, _ = mixer(x)
    (grad_parallel,) = torch.autograd.grad(y_parallel.square().sum(), x)
    assert rel_err(y_chunk, y_parallel) < 1e-5
    assert rel_err(grad_chunk, grad_parallel) < 1e-5


@pytest.mark.parametrize("prefill", [1, 37, 64])
def test_prefill_then_step_equals_full_forward(prefill):
    model = perturbed_model(tiny_cfg()).eval()
    tokens = torch.randint(0, 2048, (2, 80))
    with torch.no_grad():
        full = model(tokens).logits
        first = model(tokens[:, :prefill], return_state=True)
        second = model(tokens[:, prefill:prefill + 9], state=first.state)  # prefill continued in a piece
        logits, state = [first.logits, second.logits], second.state
        for t in range(prefill + 9, 80):
            step_logits, state = model.step(tokens[:, t], state)
            logits.append(step_logits[:, None])
    assert rel_err(torch.cat(logits, dim=1), full) < 1e-5


@pytest.mark.parametrize("T", [1, 37, 64, 130])
def test_logits_equal_transformers_xlstm(T):
    model = perturbed_model(tiny_cfg()).eval()
    hf = hf_twin(model)
    tokens = torch.randint(0, 2048, (2, T))
    with torch.no_grad():
        ours = model(tokens).logits
        theirs = hf(tokens, use_cache=False).logits
    assert rel_err(ours, theirs) < 1e-5


def test_gradients_equal_transformers_xlstm():
    model = perturbed_model(tiny_cfg()).train()
    hf = hf_twin(model)
    tokens, labels = torch.randint(0, 2048, (2, 100)), torch.randint(0, 2048, (2, 100))
    model(tokens, labels=labels).loss.backward()
    # transformers' cache updates its states in place, which autograd rejects: train it without a cache.
    logits = hf(tokens, use_cache=False).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
    theirs = {name: p.grad for name, p in hf.named_parameters()}
    for name, grad in hf_xlstm.to_hf_state_dict({n: p.grad for n, p in model.named_parameters()},
                                                 model.cfg).items():
        assert rel_err(grad, theirs[name]) < 5e-5, name


def nx_ai_twin(model: CausalLM, mode: str):
    """NX-AI's xLSTMLarge (package `xlstm`) holding our weights, on mlstm_kernels' native PyTorch kernels."""
    xlstm_large = pytest.importorskip(
        "xlstm.xlstm_large.model", reason="NX-AI's xlstm package is not installed (pip install xlstm==2.0.6)"
    )
    cfg = model.cfg
    nx_config = xlstm_large.xLSTMLargeConfig(
        embedding_dim=cfg.d_model, num_heads=cfg.n_heads, num_blocks=cfg.n_layers, vocab_size=cfg.vocab_size,
        ffn_proj_factor=cfg.ffn_multiplier, chunk_size=cfg.mlstm.chunk_size,
        chunkwise_kernel="chunkwise--native_autograd", sequence_kernel="native_sequence__native",
        step_kernel="native", mode=mode, return_last_states=True, autocast_kernel_dtype="float32",
    )
    nx = xlstm_large.xLSTMLarge(nx_config)
    # Same layout as transformers' except the embedding's name.
    state = hf_xlstm.to_hf_state_dict(model.state_dict(), cfg)
    state["embedding.weight"] = state.pop("backbone.embeddings.weight")
    nx.load_state_dict(state, strict=True)
    return nx.train(mode == "train")


@pytest.mark.parametrize("T,mode", [(1, "inference"), (37, "inference"), (130, "inference"), (128, "train")])
def test_logits_equal_nx_ai_xlstm_large(T, mode):
    model = perturbed_model(tiny_cfg()).train(mode == "train")
    nx = nx_ai_twin(model, mode)
    tokens = torch.randint(0, 2048, (2, T))
    with torch.no_grad():
        ours = model(tokens, return_state=True)
        theirs, nx_state = nx(tokens)
    assert rel_err(ours.logits, theirs) < 1e-5
    for layer, layer_state in enumerate(ours.state):
        for s_ours, s_nx in zip(layer_state, nx_state[layer], strict=True):
            assert rel_err(s_ours, s_nx) < 1e-5
