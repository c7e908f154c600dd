"""Hybrids: sliding-window attention (W), Block-State Transformer (B), SCOUT (S) and layer-pattern hybrids.

Each mixer is exactly causal, its full forward equals token-by-token `step` (and prefill then step), and
the tiny configs validate and train one step on a single process.
"""

import pytest
import torch
from harness import TINY

from models import CausalLM, ModelConfig
from models.mixers import bst
from models.registry import build_mixer
from train.config import load_config

BASE = dict(vocab_size=101, d_model=32, n_layers=2, n_heads=4, attention={"n_kv_heads": 2},
            mamba={"d_state": 4}, mamba2={"d_state": 8, "headdim": 16, "chunk_size": 8},
            sliding_window={"window": 5})
MIXERS = {  # id: (mixer name, config overrides); block, segment and window sizes do not divide T
    "W": ("sliding_window", {}),
    "B-single_head": ("bst", {"bst": {"block_size": 4, "context": "single_head", "d_state": 4}}),
    "B-multi_head": ("bst", {"bst": {"block_size": 4, "context": "multi_head", "n_context_states": 3}}),
    "B-multi_filter": ("bst", {"bst": {"block_size": 4, "context": "multi_filter", "n_context_states": 3}}),
    "S-mamba2": ("scout", {"scout": {"segment_size": 3, "local_mixer": "mamba2"}}),
    "S-mamba": ("scout", {"scout": {"segment_size": 3, "local_mixer": "mamba"}}),
    "S-sliding_window": ("scout", {"scout": {"segment_size": 3, "local_mixer": "sliding_window"}}),
}
HYBRID = ModelConfig(**{**BASE, "n_layers": 4, "pattern": "mmmA"})


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def mixer(case: str) -> torch.nn.Module:
    name, overrides = MIXERS[case]
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(**BASE, pattern={"sliding_window": "W", "bst": "B", "scout": "S"}[name],
                                 **overrides))  # builds the mixer with the model's initialisation
    assert type(model.blocks[0].mixer) is type(build_mixer(name, model.cfg, 0))
    return model.blocks[0].mixer.eval()


@pytest.mark.parametrize("case", list(MIXERS))
@pytest.mark.parametrize("t", [13, 29])
def test_mixer_is_causal(case, t):
    """Perturbing token p changes no output before p, and does change outputs from p on."""
    m = mixer(case)
    x = torch.randn(2, t, 32)
    with torch.no_grad():
        y, _ = m(x)
        for p in (0, t // 2, t - 1):
            x2 = x.clone()
            x2[:, p] += 3 * torch.randn(2, 32)
            y2, _ = m(x2)
            # BST's FFT convolution mixes all positions at rounding level (~1e-7), hence the tolerance.
            assert p == 0 or (y2[:, :p] - y[:, :p]).abs().max().item() < 1e-5, f"output before {p} changed"
            assert (y2[:, p:] - y[:, p:]).abs().max().item() > 1e-3


def test_pattern_hybrid_is_causal():
    torch.manual_seed(0)
    model = CausalLM(HYBRID).eval()
    ids = torch.randint(0, 101, (2, 21))
    with torch.no_grad():
        logits = model(ids).logits
        for p in (0, 10, 20):
            ids2 = ids.clone()
            ids2[:, p] = (ids2[:, p] + 1) % 101
            logits2 = model(ids2).logits
            assert torch.equal(logits2[:, :p], logits[:, :p])
            assert (logits2[:, p:] - logits[:, p:]).abs().max() > 1e-4


def step_through(f_step, state, xs):
    ys = []
    for t in range(xs.shape[1]):
        y, state = f_step(xs[:, t], state)
        ys.append(y)
    return torch.stack(ys, dim=1), state


@pytest.mark.parametrize("case", list(MIXERS))
def test_mixer_forward_equals_step_and_prefill_then_step(case):
    m = mixer(case)
    t = 23
    x = torch.randn(2, t, 32)
    with torch.no_grad():
        y, _ = m(x)
        y_step, _ = step_through(m.step, m.init_state(2), x)
        assert rel_err(y_step, y) < 1e-5
        for split in (1, 8, 12):  # inside, at the end of, and just after a block / segment
            _, state = m(x[:, :split])
            y_rest, _ = step_through(m.step, state, x[:, split:])
            assert rel_err(y_rest, y[:, split:]) < 1e-5, f"prefill {split} then step"
            y_cont, _ = m(x[:, split:], m(x[:, :split])[1])  # prefill in two pieces
            assert rel_err(y_cont, y[:, split:]) < 1e-5


@pytest.mark.parametrize("case", [c for c in MIXERS if c.startswith("B-")])
def test_bst_ssm_in_fft_blocks_equals_step(case, monkeypatch):
    """Longer than FFT_BLOCK, BST's SSM convolves block by block and passes its state on: 23 tokens in blocks
    of 5 (and the prefixes of 8 and 12 tokens, a shorter last block each) still equal the recurrence."""
    monkeypatch.setattr(bst, "FFT_BLOCK", 5)
    test_mixer_forward_equals_step_and_prefill_then_step(case)


def test_bst_ssm_in_fft_blocks_has_the_one_fft_gradient(monkeypatch):
    torch.manual_seed(0)
    ssm = bst.DiagonalSSM(8, 2, 4, (1e-2, 1e-1))
    ssm.init_weights()
    x, w = torch.randn(2, 23, 8, requires_grad=True), torch.randn(2, 23, 16)
    grads = {}
    for block in (64, 5):  # one FFT over all 23 tokens, then blocks of 5 and a last one of 3
        monkeypatch.setattr(bst, "FFT_BLOCK", block)
        y, state = ssm(x)
        grads[block] = torch.autograd.grad((y * w).sum() + state.sum(), [x, *ssm.parameters()])
    for ours, one_fft in zip(grads[5], grads[64], strict=True):
        assert rel_err(ours, one_fft) < 1e-5


def test_pattern_hybrid_forward_equals_step():
    torch.manual_seed(0)
    model = CausalLM(HYBRID).eval()
    ids = torch.randint(0, 101, (2, 19))
    with torch.no_grad():
        logits = model(ids).logits
        steps, _ = step_through(model.step, model.init_state(2), ids)
        assert rel_err(steps, logits) < 1e-5
        out = model(ids[:, :7], return_state=True)
        rest, _ = step_through(model.step, out.state, ids[:, 7:])
        assert rel_err(rest, logits[:, 7:]) < 1e-5


def test_decoding_state_is_bounded_except_scout_checkpoints():
    with torch.no_grad():
        w = mixer("W")
        _, state = w(torch.randn(1, 29, 32))
        assert state.k.shape[2] == w.window - 1 and state.seen == 29
        bst = mixer("B-single_head")
        _, state = bst(torch.randn(1, 29, 32))
        assert state.block.k.shape[2] == 29 % 4 and state.context.k.shape[2] == 4
        scout = mixer("S-mamba2")
        _, state = scout(torch.randn(1, 29, 32))
        assert state.checkpoints.k.shape[2] == 29 // 3  # one checkpoint per completed segment


def test_sliding_window_sequence_parallel_split_equals_forward():
    """project -> mix -> output (what the Ulysses wrapper runs around all-to-alls) equals forward."""
    m = mixer("W")
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        torch.testing.assert_close(m.output(m.mix(*m.project(x)), x), m(x)[0])


def test_unknown_pattern_letter_is_named():
    with pytest.raises(ValueError, match=r"unknown layer letters \['Z'\]"):
        ModelConfig(**{**BASE, "pattern": "mZ"})


def test_pattern_must_divide_depth():
    with pytest.raises(ValueError, match=r"n_layers=6 is not a multiple of len\(pattern\)=4 \('mmmA'\)"):
        ModelConfig(**{**BASE, "n_layers": 6, "pattern": "mmmA"})


def test_new_letters_map_to_mixers():
    cfg = ModelConfig(**{**BASE, "n_layers": 6, "pattern": "WBS"})
    assert cfg.layer_mixers() == ["sliding_window", "bst", "scout"] * 2


@pytest.mark.parametrize("name", ["bst", "scout", "hybrid"])
def test_tiny_config_validates_and_trains_one_step(name):
    cfg = load_config(TINY / f"{name}.yaml")
    assert cfg.parallel.zero_stage == 2
    assert cfg.model_dump(exclude={"model", "run_dir"}) == load_config(TINY / "transformer.yaml").model_dump(
        exclude={"model", "run_dir"})
    torch.manual_seed(0)
    model = CausalLM(cfg.model)
    ids = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len))
    loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
