"""Packed documents (the concat baseline's doc_ids): no token sees another document.

Checked as isolation (rewriting earlier documents changes nothing later) for every family that supports it,
and for attention also against each document run on its own: RoPE is relative, so a document packed at an
offset reads exactly as one starting at position 0. The mLSTM's reset (forget gate 0) clears C and n but
starts the stabiliser m from the input gate, not from a fresh state's 0, so its outputs match a separate run
only to ~1e-3 (the exp(-m) floor of the normaliser differs), while no information crosses the boundary.
"""

import pytest
import torch
import yaml
from harness import TINY

from models import CausalLM, ModelConfig


def packed(cfg: ModelConfig, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, cfg.vocab_size, (1, sum(lengths)))
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    return ids, doc_ids


@pytest.mark.parametrize("family", ["transformer", "xlstm"])
def test_no_information_crosses_a_document_boundary(family):
    torch.manual_seed(0)
    cfg = ModelConfig(**yaml.safe_load((TINY / f"{family}.yaml").read_text())["model"])
    model = CausalLM(cfg).eval()
    lengths = [13, 40, 1, 29]  # not multiples of the mLSTM chunk
    ids, doc_ids = packed(cfg, lengths)
    changed = ids.clone()
    changed[:, :53] = torch.randint(0, cfg.vocab_size, (1, 53))  # rewrite the first two documents
    with torch.no_grad():
        logits = model(ids, doc_ids=doc_ids).logits[:, 53:]
        assert torch.allclose(model(changed, doc_ids=doc_ids).logits[:, 53:], logits, rtol=0, atol=1e-5)
        # Without doc_ids the later documents do read the earlier ones.
        assert not torch.allclose(model(changed).logits[:, 53:], model(ids).logits[:, 53:], atol=1e-3)


def test_packed_attention_equals_each_document_on_its_own():
    torch.manual_seed(0)
    cfg = ModelConfig(**yaml.safe_load((TINY / "transformer.yaml").read_text())["model"])
    model = CausalLM(cfg).eval()
    lengths = [13, 40, 1, 29]
    ids, doc_ids = packed(cfg, lengths)
    with torch.no_grad():
        together = model(ids, doc_ids=doc_ids).logits
        apart = torch.cat([model(piece).logits for piece in ids.split(lengths, dim=1)], dim=1)
    assert ((together - apart).norm() / apart.norm()).item() < 1e-5


def test_families_without_document_boundaries_refuse_doc_ids():
    cfg = ModelConfig(**yaml.safe_load((TINY / "mamba2.yaml").read_text())["model"])
    ids, doc_ids = packed(cfg, [5, 7])
    with pytest.raises(ValueError, match="document boundaries"):
        CausalLM(cfg)(ids, doc_ids=doc_ids)
