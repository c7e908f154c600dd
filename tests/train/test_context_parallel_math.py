"""State passing's per-family math in one process: the pieces of a sequence, each started from the state the
scan over its predecessors gives (train/context_parallel.py start_state, the mixers' cp_* methods), equal the
unsplit mixer, outputs and every gradient. The collectives around it are tested on real ranks in
test_context_parallel.py; here 4 pieces exercise the carry through the middle pieces."""

import copy
import threading

import pytest
import torch
from harness import TINY

from models import CausalLM
from models.documents import Documents
from train.config import load_config
from train.context_parallel import ContextParallel, cp_mode, start_state, wrap_mixer

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


def assert_close(split, whole, got: dict, expected: dict) -> None:
    """Outputs and every gradient within 1e-5 relative (fp32; measured <= 1.1e-6)."""
    assert ((split - whole).norm() / whole.norm()).item() < 1e-5
    assert got.keys() == expected.keys()
    for name, g in expected.items():
        err = ((got[name] - g).norm() / g.norm().clamp_min(1e-12)).item()
        assert err < 1e-5, f"{name}: {err:.2e}"


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
    assert_close(split, whole, got, expected)


# Packed documents under CP, on the ranks' own code (train/context_parallel.py ContextParallel) run in one
# process: each of 4 threads is a CP rank of 12 tokens, its collectives a rendezvous handing every rank the
# others' tensors themselves, so one backward of the summed outputs gives the gradients the real exchange's
# reduce-scatter would. Boundaries chosen to hit each case: documents starting at a piece's start (row 1 at 12
# and 24), inside a middle piece's convolution halo (row 0 at 11, row 1 at 22), of one token (row 1 at 47), and
# one document over every piece (row 2: the state carried through the middle pieces' transitions).
PACKED_CU_SEQLENS = [0, 5, 11, 30, 40, 48, 60, 70, 72, 95, 96, 144]
PACKED_FAMILIES = FAMILIES | {
    "attention": ("transformer", []),
    "sliding_window_halo": ("transformer", ["model.pattern=W", "model.sliding_window.window=8"]),
    "sliding_window_wide": ("transformer", ["model.pattern=W", "model.sliding_window.window=20"]),
    "mom": ("mom", []),
    "bst": ("bst", []),
    "scout": ("scout", []),
}


class Rendezvous:
    """The collectives of `size` threads: every rank's tensor, in rank order."""

    def __init__(self, size: int):
        self.slots, self.barrier = [None] * size, threading.Barrier(size)

    def exchange(self, rank: int, x: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = x
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out


class ThreadRank(ContextParallel):
    def __init__(self, rank: int, size: int, meeting: Rendezvous):
        self.group = self.seq_group = self.sp = None
        self.rank = self.seq_rank = rank
        self.size, self.meeting = size, meeting

    def all_gather(self, x, dim=1):
        return torch.cat(self.meeting.exchange(self.rank, x), dim=dim)

    def gather_sequence(self, x):
        return self.all_gather(x, dim=1)

    def all_reduce(self, x):
        return torch.stack(self.meeting.exchange(self.rank, x)).sum(0)


def cp_ranks_on_threads(mixer, x: torch.Tensor, docs: Documents | None, size: int):
    """Every rank's output of x (B, T, D) (`docs` packed in it, if given), concatenated, and the rank's wrapped
    copies."""
    meeting, outputs, errors = Rendezvous(size), [None] * size, []
    copies = [copy.deepcopy(mixer) for _ in range(size)]
    for rank, m in enumerate(copies):
        wrap_mixer(m, ThreadRank(rank, size, meeting))

    def work(rank):
        try:
            piece = x.chunk(size, dim=1)[rank]
            outputs[rank] = copies[rank](piece)[0] if docs is None else copies[rank].forward_packed(piece, docs)
        except BaseException as e:  # noqa: BLE001 - reported below, with the other ranks released
            errors.append(e)
            meeting.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return torch.cat(outputs, dim=1), copies


@pytest.mark.parametrize("family", PACKED_FAMILIES)
def test_packed_documents_over_four_pieces_equal_each_document_alone(family):
    config, overrides = PACKED_FAMILIES[family]
    cfg = load_config(TINY / f"{config}.yaml", ["parallel.precision=fp32", *overrides])
    torch.manual_seed(0)
    mixer = CausalLM(cfg.model).blocks[0].mixer
    x = torch.randn(3, 48, cfg.model.d_model, requires_grad=True)
    weights = torch.randn(3, 48, cfg.model.d_model, generator=torch.Generator().manual_seed(1))
    docs = Documents.from_cu_seqlens(torch.tensor(PACKED_CU_SEQLENS), 3, 48)

    # Reference: every document run alone from a fresh state through the mixer's plain forward.
    flat = x.flatten(0, 1)
    bounds = list(zip(PACKED_CU_SEQLENS[:-1], PACKED_CU_SEQLENS[1:]))
    whole = torch.cat([mixer(flat[a:b][None])[0][0] for a, b in bounds]).view_as(x)
    (whole * weights).sum().backward()
    expected = {n: p.grad.clone() for n, p in mixer.named_parameters() if p.grad is not None} | {"x": x.grad.clone()}
    x.grad = None
    mixer.aux_loss = None  # MoM's, of the reference: a graph's tensor cannot be deep-copied

    split, copies = cp_ranks_on_threads(mixer, x, docs, 4)
    (split * weights).sum().backward()
    assert_close(split, whole, grads_of_split(mixer, copies, x), expected)


def grads_of_split(mixer, copies, x) -> dict:
    """Every parameter's gradient summed over the ranks' copies (what the all-gathers' backward adds up), and x's."""
    got = {"x": x.grad}
    for name, _ in mixer.named_parameters():
        grads = [dict(m.named_parameters())[name].grad for m in copies]
        if any(g is not None for g in grads):
            got[name] = sum(g for g in grads if g is not None)
    return got


# SCOUT under CP (mode 'composite'): its local mixer passes its state, or a sliding window its halo, and its
# checkpoint attention gathers only the earlier pieces' checkpoints. 4 pieces of 12 tokens with segments of 16
# (pieces hold 0 or 1 checkpoint each) and of 8 (1 or 2), so pieces differ in their number of checkpoints.
SCOUT_LOCALS = {
    "mamba2-s16": [],
    "mamba-s8": ["model.scout.local_mixer=mamba", "model.scout.segment_size=8"],
    "sliding_window-s8": ["model.scout.local_mixer=sliding_window", "model.sliding_window.window=8",
                          "model.scout.segment_size=8"],
}


def assert_composite_over_four_pieces_equals_whole(config: str, overrides: list[str]) -> None:
    """A composite mixer's ranks (on threads) give the whole sequence's output and every gradient."""
    cfg = load_config(TINY / f"{config}.yaml", ["parallel.precision=fp32", *overrides])
    torch.manual_seed(0)
    mixer = CausalLM(cfg.model).blocks[0].mixer
    assert cp_mode(mixer) == "composite"
    x = torch.randn(2, 48, cfg.model.d_model, requires_grad=True)
    weights = torch.randn(2, 48, cfg.model.d_model, generator=torch.Generator().manual_seed(1))
    whole = mixer(x)[0]
    (whole * weights).sum().backward()
    expected = {n: p.grad.clone() for n, p in mixer.named_parameters() if p.grad is not None} | {"x": x.grad.clone()}
    x.grad = None
    split, copies = cp_ranks_on_threads(mixer, x, None, 4)
    (split * weights).sum().backward()
    assert_close(split, whole, grads_of_split(mixer, copies, x), expected)


@pytest.mark.parametrize("local", SCOUT_LOCALS)
def test_scout_over_four_pieces_equals_the_whole_sequence(local):
    assert_composite_over_four_pieces_equals_whole("scout", SCOUT_LOCALS[local])


# BST under CP (mode 'composite'): its SSM passes its state (outputs corrected from it), its blocks take the
# previous piece's inputs and SSM outputs as a halo. 4 pieces of 12 tokens with blocks of 16 (blocks straddle
# pieces, and the halo reaches past the previous piece) and of 8 (1 and 2 blocks begun in a piece).
BST_VARIANTS = {
    f"{context}-w{w}": [f"model.bst.context={context}", f"model.bst.block_size={w}"]
    for context in ("single_head", "multi_head", "multi_filter") for w in (16, 8)
}


@pytest.mark.parametrize("variant", BST_VARIANTS)
def test_bst_over_four_pieces_equals_the_whole_sequence(variant):
    assert_composite_over_four_pieces_equals_whole("bst", BST_VARIANTS[variant])
