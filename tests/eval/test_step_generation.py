"""Generation through `step`: the decoding state of recurrent families does not grow with generated tokens.

Measured as bytes of the state's tensors after every step (not process RSS, which allocator noise swamps).
Attention's KV cache is the contrast: it grows by exactly one key and one value per layer per token.
"""

import pytest
import torch

from eval.generation import generate_tokens, prefill, state_nbytes
from models import CausalLM, ModelConfig

FAMILIES = {
    "attention": dict(mixer="attention", n_heads=4),
    "mlstm": dict(mixer="mlstm", n_heads=2),
    "mamba": dict(mixer="mamba", n_heads=1, ffn_hidden=0, mamba={"d_state": 8}),
    "mamba2": dict(mixer="mamba2", n_heads=4, ffn_hidden=0, mamba2={"d_state": 8, "headdim": 16, "chunk_size": 16}),
    "gated_deltanet": dict(mixer="gated_deltanet", n_heads=2, gated_deltanet={"head_dim": 16, "n_v_heads": 4}),
}


def tiny(family: str) -> CausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, max_seq_len=64, **FAMILIES[family])
    return CausalLM(cfg).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_state_bytes_per_generated_token(family):
    model = tiny(family)
    prompt = torch.randint(0, 97, (2, 11))
    sizes = []
    tokens = generate_tokens(model, prompt, 40, on_step=lambda i, state: sizes.append(state_nbytes(state)))
    assert len(tokens[0]) == 40 and len(sizes) == 39
    if family == "attention":
        growth = {b - a for a, b in zip(sizes, sizes[1:])}
        per_token = 2 * model.cfg.n_layers * 2 * model.cfg.d_model * 4  # k and v, 2 layers, batch 2, fp32
        assert growth == {per_token}
    else:
        assert len(set(sizes)) == 1 and sizes[0] > 0
        _, state = prefill(model, prompt)
        assert state_nbytes(state) == sizes[0]  # prefill's state is the same fixed size


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_step_generation_equals_model_generate(family):
    model = tiny(family)
    prompt = torch.randint(0, 97, (3, 9))
    ours = generate_tokens(model, prompt, 12, chunk_size=4)  # chunked prefill carries the state across chunks
    reference = model.generate(prompt, max_new_tokens=12)[:, 9:]
    assert ours == reference.tolist()


def test_generation_stops_at_eos_and_on_request():
    model = tiny("mlstm")
    prompt = torch.randint(0, 97, (2, 5))
    free = generate_tokens(model, prompt, 10)
    eos = free[0][3]
    stopped = generate_tokens(model, prompt, 10, eos_id=eos)
    assert stopped[0] == free[0][:free[0].index(eos)]
    short = generate_tokens(model, prompt, 10, is_done=lambda toks: len(toks) >= 4)
    assert [len(t) for t in short] == [4, 4]
