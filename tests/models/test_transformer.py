"""The Llama-style baseline: logits equal transformers' LlamaForCausalLM, and step decoding equals forward."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from models import CausalLM, ModelConfig

CFG = ModelConfig(vocab_size=97, d_model=48, n_layers=2, n_heads=4, ffn_hidden=80, attention={"n_kv_heads": 2})


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def to_llama(model: CausalLM) -> LlamaForCausalLM:
    cfg = model.cfg
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.attention.n_kv_heads, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.attention.rope_theta, tie_word_embeddings=False, attn_implementation="eager",
    ))
    ours = model.state_dict()
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
    for i in range(cfg.n_layers):
        p, q = f"blocks.{i}.", f"model.layers.{i}."
        names |= {p + "mixer_norm.weight": q + "input_layernorm.weight",
                  p + "ffn_norm.weight": q + "post_attention_layernorm.weight"}
        names |= {p + f"mixer.{x}_proj.weight": q + f"self_attn.{x}_proj.weight" for x in "qkvo"}
        names |= {p + f"ffn.{a}.weight": q + f"mlp.{b}_proj.weight" for a, b in
                  [("gate", "gate"), ("up", "up"), ("down", "down")]}
    hf.load_state_dict({names[k]: v for k, v in ours.items()})
    return hf.eval()


@pytest.mark.parametrize("seq_len", [1, 17, 64])
def test_logits_equal_transformers_llama(seq_len):
    torch.manual_seed(0)
    model = CausalLM(CFG).eval()
    ids = torch.randint(0, CFG.vocab_size, (2, seq_len))
    with torch.no_grad():
        ours = model(ids).logits
        theirs = to_llama(model)(ids).logits
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


def test_greedy_generate_equals_transformers():
    torch.manual_seed(0)
    model = CausalLM(CFG).eval()
    prompt = torch.randint(0, CFG.vocab_size, (1, 7))
    ours = model.generate(prompt, max_new_tokens=12)
    theirs = to_llama(model).generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
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
