"""The Llama-style baseline: logits equal transformers' LlamaForCausalLM, and step decoding equals forward."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from models import CausalLM, ModelConfig
from models.hf.export import export_hf

CFG = ModelConfig(vocab_size=97, d_model=48, n_layers=2, n_heads=4, ffn_hidden=80, attention={"n_kv_heads": 2})


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def to_llama(model: CausalLM, folder) -> LlamaForCausalLM:
    """Our model through its Hugging Face export (models/hf/llama.py), loaded by transformers' own class."""
    hf = AutoModelForCausalLM.from_pretrained(export_hf(model, folder), attn_implementation="eager")
    assert isinstance(hf, LlamaForCausalLM)
    return hf.eval()


@pytest.mark.parametrize("seq_len", [1, 17, 64])
@pytest.mark.parametrize("tied", [False, True])
def test_logits_equal_transformers_llama(seq_len, tied, tmp_path):
    torch.manual_seed(0)
    model = CausalLM(CFG.model_copy(update={"tie_embeddings": tied})).eval()
    ids = torch.randint(0, CFG.vocab_size, (2, seq_len))
    with torch.no_grad():
        ours = model(ids).logits
        theirs = to_llama(model, tmp_path)(ids).logits
    assert rel_err(ours, theirs) < 1e-5


def test_prefill_then_step_equals_full_forward():
    torch.manual_seed(0)
    model = CausalLM(CFG).eval()
    ids = torch.randint(0, CFG.vocab_size, (2, 21))
    with torch.no_grad():
        full = model(ids).logits
        prefill = model(ids[:, :9], return_state=True)
        state, stepped = prefill.state, [prefill.logits]
        for t in range(9, 21):
            logits, state = model.step(ids[:, t], state)
            stepped.append(logits[:, None])
    assert rel_err(torch.cat(stepped, dim=1), full) < 1e-5


def test_greedy_generate_equals_transformers(tmp_path):
    torch.manual_seed(0)
    model = CausalLM(CFG).eval()
    prompt = torch.randint(0, CFG.vocab_size, (1, 7))
    ours = model.generate(prompt, max_new_tokens=12)
    theirs = to_llama(model, tmp_path).generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = CausalLM(CFG.model_copy(update={"activation_checkpointing": recompute})).train()
        ids = torch.randint(0, CFG.vocab_size, (2, 16))
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.equal(grads[0], grads[1])


def test_a_llama_saved_by_transformers_loads_as_our_baseline(tmp_path):
    from transformers import LlamaConfig

    from models.hf.export import load_hf

    torch.manual_seed(0)
    theirs = LlamaForCausalLM(LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=50000.0, max_position_embeddings=256, attn_implementation="eager",
    )).eval()
    theirs.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval()
    assert ours.cfg.attention.rope_theta == 50000.0 and ours.cfg.attention.n_kv_heads == 2
    ids = torch.randint(0, 101, (2, 23))
    with torch.no_grad():
        assert rel_err(ours(ids).logits, theirs(ids).logits) < 1e-5
