"""Mamba-1 (models/mixers/mamba.py, models/hf/mamba.py) against transformers' MambaForCausalLM on its CPU
path: same weights give the same logits; forward, prefill and step agree; the export loads in transformers and
generates our tokens; parameter counts of the real configs. The helpers here serve test_mamba2.py too.
"""

from pathlib import Path

import pytest
import torch
import transformers
import yaml
from harness import ROOT, TINY, transformers_own_auto_classes

from models import CausalLM, ModelConfig, count_parameters
from models.hf import export_hf, load_hf
from models.hf import mamba as hf_mamba
from train.config import load_config
from train.optimizer import param_groups

transformers.logging.set_verbosity_error()  # the "falling back to PyTorch" notes of every kernel


@pytest.fixture(autouse=True)
def _transformers_own_classes():
    # Other test modules import flash-linear-attention, which takes over these Auto entries.
    with transformers_own_auto_classes("mamba"):
        yield


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny_model(config: str, seed: int = 0, **model_overrides) -> CausalLM:
    """The CausalLM of configs/tiny/<config>.yaml (fp32, random weights), with `model:` fields overridden."""
    raw = yaml.safe_load((TINY / f"{config}.yaml").read_text())["model"]
    torch.manual_seed(seed)
    return CausalLM(ModelConfig(**{**raw, **model_overrides})).eval()


def transformers_twin(model: CausalLM, family, hf_class) -> torch.nn.Module:
    """transformers' model of our converted config, holding our weights (its CPU fallback paths run)."""
    hf = hf_class(family.to_hf_config(model.cfg)).eval()
    state = family.to_hf_state_dict(model.state_dict(), model.cfg)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # a tied head is the embedding
    return hf


@torch.no_grad()
def check_logits_equal_transformers(model: CausalLM, hf: torch.nn.Module, length: int) -> float:
    ids = torch.randint(0, model.cfg.vocab_size, (2, length))
    err = rel_err(model(ids).logits, hf(ids).logits)
    assert err < 1e-5, err
    return err


@torch.no_grad()
def check_forward_prefill_and_steps_agree(model: CausalLM, length: int = 19, prefill: int = 7) -> None:
    ids = torch.randint(0, model.cfg.vocab_size, (2, length))
    full = model(ids, return_state=True)
    # Token by token from the empty state.
    state, step_logits = model.init_state(2), []
    for t in range(length):
        logits, state = model.step(ids[:, t], state)
        step_logits.append(logits)
    assert rel_err(torch.stack(step_logits, dim=1), full.logits) < 1e-5
    for ours, theirs in zip(state, full.state):
        assert rel_err(ours.conv, theirs.conv) < 1e-5 and rel_err(ours.ssm, theirs.ssm) < 1e-5
    # Prefill a prompt in two pieces (the second continues the first's state), then step.
    out = model(ids[:, :3], return_state=True)
    out = model(ids[:, 3:prefill], state=out.state)
    state, step_logits = out.state, [out.logits]
    for t in range(prefill, length):
        logits, state = model.step(ids[:, t], state)
        step_logits.append(logits[:, None])
    assert rel_err(torch.cat(step_logits, dim=1), full.logits[:, 3:]) < 1e-5


@torch.no_grad()
def check_export_loads_in_transformers(model: CausalLM, folder: Path, hf_class) -> None:
    export_hf(model, folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert isinstance(hf, hf_class)
    prompt = torch.randint(0, model.cfg.vocab_size, (2, 11))
    assert rel_err(model(prompt).logits, hf(prompt).logits) < 1e-5
    ours = model.generate(prompt, max_new_tokens=12)
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs), (ours, theirs)
    # And back: the same weights and the same SSM parameters kept out of weight decay.
    back = load_hf(folder)
    assert back.cfg.model_dump(exclude={"max_seq_len"}) == model.cfg.model_dump(exclude={"max_seq_len"})
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    return back


def no_decay_names(model: torch.nn.Module) -> set[str]:
    no_decay = {id(p) for p in param_groups(model, 0.1)[1]["params"]}
    return {name for name, p in model.named_parameters() if id(p) in no_decay}


def check_param_count(config: Path, published: float, tolerance: float, hf_class, family) -> None:
    cfg = load_config(config).model
    ours = count_parameters(cfg)
    assert abs(ours / published - 1) < tolerance, (config.name, ours, published)
    with torch.device("meta"):
        hf = hf_class(family.to_hf_config(cfg))
    assert ours == sum(p.numel() for p in hf.parameters()), config.name


# ---- Mamba-1 ----------------------------------------------------------------------------------------------

def twin(model):
    return transformers_twin(model, hf_mamba, transformers.MambaForCausalLM)


@pytest.mark.parametrize("length", [1, 21, 64])
def test_logits_equal_transformers_mamba(length):
    model = tiny_model("mamba")
    check_logits_equal_transformers(model, twin(model), length)


def test_logits_equal_transformers_with_biases_untied_and_explicit_dt_rank():
    mamba = {"d_state": 8, "dt_rank": 7, "bias": True, "d_conv": 3}
    model = tiny_model("mamba", tie_embeddings=False, mamba=mamba)
    check_logits_equal_transformers(model, twin(model), 13)


def test_forward_prefill_and_steps_agree_mamba():
    check_forward_prefill_and_steps_agree(tiny_model("mamba"))


def test_export_loads_in_transformers_and_generates_our_tokens_mamba(tmp_path):
    model = tiny_model("mamba")
    back = check_export_loads_in_transformers(model, tmp_path, transformers.MambaForCausalLM)
    assert no_decay_names(back) >= {f"blocks.{i}.mixer.{n}" for i in range(2) for n in ("A_log", "D")}


def test_ssm_parameters_are_registered_and_kept_out_of_weight_decay():
    model = tiny_model("mamba")
    names = no_decay_names(model)
    for i in range(model.cfg.n_layers):
        assert {f"blocks.{i}.mixer.A_log", f"blocks.{i}.mixer.D", f"blocks.{i}.mixer.dt_proj.bias"} <= names
        assert f"blocks.{i}.mixer.in_proj.weight" not in names
    mixer = model.blocks[0].mixer
    # The S4D-real init and a dt in [dt_min, dt_max] after the softplus.
    assert torch.allclose(mixer.A_log.exp(), torch.arange(1.0, 17.0).expand(mixer.d_inner, -1))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)


def test_tiny_configs_validate_with_zero3():
    for name in ("mamba", "mamba2"):
        cfg = load_config(TINY / f"{name}.yaml")
        assert cfg.parallel.zero_stage == 3 and cfg.model.mixer == name and cfg.model.ffn_hidden_size == 0


@pytest.mark.parametrize(
    "size,published", [("130m", 130e6), ("370m", 370e6), ("790m", 790e6), ("1.4b", 1.4e9), ("2.8b", 2.8e9)]
)
def test_param_counts_match_published_and_transformers_mamba(size, published):
    check_param_count(ROOT / "configs" / f"mamba_{size}.yaml", published, 0.02, transformers.MambaForCausalLM,
                      hf_mamba)


def test_export_refuses_what_transformers_mamba_cannot_hold():
    with pytest.raises(ValueError, match="ffn_hidden: 0"):
        hf_mamba.to_hf_config(tiny_model("mamba", ffn_hidden=128).cfg)
    with pytest.raises(ValueError, match="mamba layers only"):
        hf_mamba.to_hf_config(tiny_model("mamba", pattern="MA", n_layers=2).cfg)
