"""Which parameters AdamW decays."""

from models import CausalLM, ModelConfig
from train.optimizer import param_groups

CFG = ModelConfig(vocab_size=97, d_model=48, n_layers=2, n_heads=4)


def test_weight_decay_skips_norms_biases_and_embeddings():
    model = CausalLM(CFG)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] or "embed" in names[id(p)] for p in no_decay["params"])
    assert not any("norm" in names[id(p)] or "embed" in names[id(p)] for p in decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
