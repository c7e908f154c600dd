"""Every tiny family round-trips through its Hugging Face folder: export_hf then load_hf gives the same model
(and the sequence length it trained at)."""

import pytest
import torch
import yaml
from harness import TINY

from models import CausalLM, ModelConfig
from models.hf.export import export_hf, load_hf

FAMILIES = sorted(p.stem for p in TINY.glob("*.yaml"))


@pytest.mark.parametrize("family", FAMILIES)
def test_export_then_load_gives_identical_logits(family, tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(**yaml.safe_load((TINY / f"{family}.yaml").read_text())["model"])
    model = CausalLM(cfg).eval()
    loaded = load_hf(export_hf(model, tmp_path)).eval()
    assert loaded.cfg.layer_mixers() == cfg.layer_mixers()
    assert loaded.cfg.max_seq_len == cfg.max_seq_len  # the length it trained at, in every family's folder
    ids = torch.randint(0, cfg.vocab_size, (2, 19))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
