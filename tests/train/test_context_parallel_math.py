"""State passing's per-family math in one process: the pieces of a sequence, each started from the state the
scan over its predecessors gives (train/context_parallel.py start_state, the mixers' cp_* methods), equal the
unsplit mixer, outputs and every gradient. The collectives around it are tested on real ranks in
test_context_parallel.py; here 4 pieces exercise the carry through the middle pieces."""

import pytest
import torch
from harness import TINY

from models import CausalLM
from train.config import load_config
from train.context_parallel import cp_mode, start_state

# (tiny config, overrides, layer letter): every state-passing mixer; pieces of 12 tokens do not divide the
# chunk sizes (16, 32).
FAMILIES = {
    "mlstm": ("xlstm", ["model.mlstm.chunk_size=16"]),
    "mamba": ("mamba", []),
    "mamba2": ("mamba2", []),
    "hgrn2": ("hgrn2", []),
    "gated_deltanet": ("gated_deltanet", []),
}


def simulated_pieces(mixer, x: torch.Tensor, pieces: int) -> torch.Tensor:
    """Every CP rank's output, computed in one process as the ranks compute it: on the whole mixer, or on its
    heads' projections (`cp_core`)."""
    xs = x.chunk(pieces, dim=1)
    if hasattr(mixer, "cp_core"):
        inputs = [mixer.project(p) for p in xs]
        core = mixer.cp_core
    else:
        inputs, core = xs, mixer
    halo = mixer.cp_halo_tokens
    end = lambda p: [t[:, -halo:] for t in p] if isinstance(p, tuple) else p[:, -halo:]  # noqa: E731
    tails = [None] + [end(p) if halo else None for p in inputs[:-1]]
    y0, own0 = core(inputs[0], None)
    owns = [own0] + [core(p, mixer.cp_empty(p, tail))[1] for p, tail in zip(inputs[1:], tails[1:])]
    transitions = [mixer.cp_transition(p, tail) for p, tail in zip(inputs, tails)]
    ys = [y0] + [core(p, start_state(mixer, owns, transitions, r))[0] for r, p in enumerate(inputs) if r > 0]
    if hasattr(mixer, "cp_core"):
        ys = [mixer.output(y, p) for y, p in zip(ys, xs)]
    return torch.cat(ys, dim=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_pieces_from_passed_states_equal_the_whole_sequence(family):
    config, overrides = FAMILIES[family]
    cfg = load_config(TINY / f"{config}.yaml", ["parallel.precision=fp32", *overrides])
    torch.manual_seed(0)
    mixer = CausalLM(cfg.model).blocks[0].mixer
    assert cp_mode(mixer) == "state passing"
    x = torch.randn(2, 48, cfg.model.d_model)

    def grads(y):
        mixer.zero_grad()
        (y * torch.randn_like(y, generator=torch.Generator().manual_seed(1))).sum().backward()
        return {n: p.grad.clone() for n, p in mixer.named_parameters() if p.grad is not None}

    whole = mixer(x)[0]
    expected = grads(whole)
    split = simulated_pieces(mixer, x, 4)
    got = grads(split)
    assert ((split - whole).norm() / whole.norm()).item() < 1e-5
    assert got.keys() == expected.keys()
    for name, g in expected.items():
        err = ((got[name] - g).norm() / g.norm().clamp_min(1e-12)).item()
        assert err < 1e-5, f"{name}: {err:.2e}"
