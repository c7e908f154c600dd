"""Context parallelism (CP): each rank of a CP group holds one contiguous piece of every sequence.

Ulysses (train/sequence_parallel.py) splits heads, so it cannot spread a sequence over more ranks than a layer
has heads. CP cuts the sequence instead; what crosses ranks depends on the mixer:

- **State passing** (mLSTM, Mamba, Mamba-2, HGRN2, Gated DeltaNet): only the recurrent state, a fixed size
  per layer whatever T is. Rank r must start from the state the unsplit run has after pieces 0..r-1. Each
  piece's final state is affine in its initial state, S_end = A_r(S_start) + own_r, where own_r is the piece
  run from an empty recurrent state and A_r its transition (the product of its decays: a vector for the
  diagonal recurrences, a matrix for the delta rule; the mLSTM's max stabiliser is combined exactly in log
  space). Every rank all-gathers the own_r (and, for CP > 2, the A_r) and folds them over the ranks before
  it: one collective per layer, the same on every rank, so it sits naturally beside ZeRO-3's gathers. A
  short causal convolution's state is the previous piece's last d_conv - 1 inputs: a halo, all-gathered
  first, and part of the empty state a piece's own contribution starts from.
  Then rank r runs its piece again from the state it received: **recomputation** rather than correcting the
  outputs, because every mixer's `forward(x, state)` is already exact on every kernel path, while a
  correction is not linear for the mLSTM (its normaliser max(|n.q|, exp(-m)) depends on the state) and
  needs the per-token decay products for the delta rule. Cost: rank 0 runs once (its final state comes
  with its output), the last rank once, the ranks between twice. The mixers' `cp_*` methods say what their
  state does; gradients flow back through the same all-gather (its backward is a reduce-scatter).
- **Attention**: the keys and values of every piece are all-gathered (Llama-3's CP); each query reads them
  with the causal mask at its absolute position. Sliding window reads only the window before its piece.
- **Gathered** (MoM, BST, SCOUT): the whole sequence is all-gathered and every rank runs the mixer on it,
  keeping its own piece of the output. Exact, but with no compute or activation saving for those layers:
  MoM's capacity routing and BST's and SCOUT's block-wise contexts need per-family state passing that is
  not written yet. The run's console and train.log say which layers do this.

Like Ulysses, the wrapper is applied from outside by swapping the mixer's class for a subclass, so parameter
names and checkpoints do not change.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from train.sequence_parallel import AllGather


def flatten_state(state) -> list[torch.Tensor]:
    """The tensors of a mixer state (a tensor, a tuple or a dataclass of them, nested), in a fixed order."""
    if isinstance(state, torch.Tensor):
        return [state]
    if dataclasses.is_dataclass(state):
        state = [getattr(state, f.name) for f in dataclasses.fields(state)]
    return [t for part in state for t in flatten_state(part)]


def unflatten_state(template, tensors: list[torch.Tensor]):
    """The inverse of flatten_state: `template`'s structure filled with `tensors` (consumed from the front)."""
    if isinstance(template, torch.Tensor):
        return tensors.pop(0)
    if dataclasses.is_dataclass(template):
        return type(template)(*(unflatten_state(getattr(template, f.name), tensors)
                                for f in dataclasses.fields(template)))
    return type(template)(unflatten_state(part, tensors) for part in template)


class ContextParallel:
    """One CP group and the exchanges a mixer makes on it (see the module docstring)."""

    def __init__(self, group):
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)

    def all_gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Every rank's piece, in rank order along `dim`: by default (B, T/cp, ...) -> (B, T, ...)."""
        return AllGather.apply(x, dim, self.group)

    def gather_flat(self, tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """[t_0, t_1, ...] on every rank -> per rank j, [t_0 of rank j, t_1 of rank j, ...]: one all-gather of
        one fp32 buffer (exact for bf16 too), so its backward is one collective that every rank makes in the
        same place whatever its graph; differentiable."""
        flat = torch.cat([t.float().flatten() for t in tensors])
        gathered = self.all_gather(flat[None], dim=0)  # (cp, total)
        sizes = [t.numel() for t in tensors]
        return [[piece.view(t.shape).to(t.dtype) for piece, t in zip(row.split(sizes), tensors)] for row in gathered]

    def offset(self, piece_length: int) -> int:
        """The absolute position of this rank's first token."""
        return self.rank * piece_length

    def run(self, mixer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The mixer's output for this rank's piece x (B, T/cp, D)."""
        if hasattr(mixer, "cp_forward"):  # attention: keys and values across pieces
            return mixer.cp_forward(x, self)
        if hasattr(mixer, "cp_carry"):
            return self.pass_state(mixer, x)
        t = x.shape[1]  # gathered: the whole sequence on every rank
        return mixer.own_forward(self.all_gather(x))[0][:, self.rank * t:(self.rank + 1) * t]

    def pass_state(self, mixer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        first, last, middle = self.rank == 0, self.rank == self.size - 1, 0 < self.rank < self.size - 1
        forward, exchanged = mixer.own_forward, []
        tail = None
        if self.size > 2 and mixer.cp_halo_tokens:  # for the middle pieces' own runs and transitions
            (tails,) = zip(*self.gather_flat([x[:, -mixer.cp_halo_tokens:]]))
            tail, exchanged = (tails[self.rank - 1] if middle else None), [*tails]
        if first:
            y, own = forward(x)  # from the sequence's start: its final state is the true one
        elif last:  # nobody reads the last piece's contribution: zeros of the state's shapes
            own = mixer.init_state(x.shape[0], x.device, x.dtype)
        else:
            own = forward(x, mixer.cp_empty(x, tail))[1]
        sent = flatten_state(own)
        if self.size > 2:  # the middle pieces pass their predecessors' state on through their transitions
            sent += list(mixer.cp_transition(x, tail))
        if last:
            sent = [t.detach().requires_grad_() for t in sent]  # so that this rank joins the backward's collective
        rows = self.gather_flat(sent)
        exchanged += [t for row in rows for t in row]
        n = len(flatten_state(own))
        owns = [unflatten_state(own, row[:n]) for row in rows]
        if not first:
            y = forward(x, start_state(mixer, owns, [row[n:] for row in rows], self.rank))[0]
        # Every rank's output depends on every exchanged tensor (with zero gradient where unused), so every rank
        # runs each exchange's backward collective.
        return Tie.apply(y, *exchanged)


class Tie(torch.autograd.Function):
    """y unchanged; the other inputs get zero gradients (see pass_state)."""

    @staticmethod
    def forward(ctx, y, *others):
        ctx.others = [(t.shape, t.dtype, t.device) for t in others]
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return grad, *(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.others)


def start_state(mixer: nn.Module, owns: list, transitions: list | None, rank: int):
    """The state piece `rank` starts from, given every piece's own contribution (the first piece's is its
    true final state) and transition: the scan over the ranks before it."""
    state = owns[0]
    for j in range(1, rank):
        state = mixer.cp_carry(state, owns[j], transitions[j])
    return state


class ContextParallelMixer:
    """Mixin placed before a mixer's class: its forward runs the mixer through `ContextParallel.run`."""

    cp: ContextParallel
    splits_sequence = True  # train/sequence_parallel.py `unsplit` takes it off

    def forward(self, x: torch.Tensor, state=None):
        if state is not None:
            raise ValueError("context parallelism is for training; decode with parallel.context_parallel_size=1")
        return self.cp.run(self, x), None

    def own_forward(self, x: torch.Tensor, state=None):
        """The mixer's own forward on whole pieces (called inside this module's forward, where ZeRO-3 has
        gathered its parameters)."""
        return super().forward(x, state)


def cp_mode(mixer: nn.Module) -> str:
    """How a mixer runs under CP: 'attention', 'state passing' or 'gathered' (module docstring)."""
    if hasattr(mixer, "cp_forward"):
        return "attention"
    return "state passing" if hasattr(mixer, "cp_carry") else "gathered"


def apply_context_parallel(model: nn.Module, group) -> None:
    """Wraps every mixer. Each is also a ZeRO-3 leaf module: its parameters are gathered once when its forward
    (and backward) starts, not by each submodule. The ranks call submodules at different points of the
    exchange (rank 0 before the all-gather, the others after), and ZeRO-3's per-submodule gathers are
    collectives that would then be out of step across ranks. For the same reason parameters a mixer reads from
    other layers (`external_parameters`, HGRN2's lower bounds) are registered with it, so ZeRO-3 gathers them
    with its own rather than on first access."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter
    from deepspeed.utils import set_z3_leaf_modules

    cp = ContextParallel(group)
    for block in model.blocks:
        cls = type(block.mixer)
        block.mixer.__class__ = type(f"ContextParallel{cls.__name__}", (ContextParallelMixer, cls), {})
        block.mixer.cp = cp
        for param in getattr(block.mixer, "external_parameters", list)():
            if hasattr(param, "ds_id"):  # partitioned by ZeRO-3
                register_external_parameter(block.mixer, param)
    set_z3_leaf_modules(model, [ContextParallelMixer])


def check_context_parallel(model: nn.Module, cp: int, shortest_piece: int, length_key: str, packed: bool,
                           sp: int) -> None:
    """Raises ValueError naming the problem and the fix when the model cannot run over cp pieces."""
    if packed:
        raise ValueError("data.separate_documents (packed documents) under context parallelism is not supported "
                         "yet: the states would have to stop at document boundaries across ranks; use "
                         "data.mode=decompose (no chunk mixes documents) or parallel.context_parallel_size=1")
    if sp > 1:
        raise ValueError("context parallelism together with Ulysses sequence parallelism is not supported yet; "
                         "set parallel.sequence_parallel_size=1 or parallel.context_parallel_size=1")
    for i, block in enumerate(model.blocks):
        halo = getattr(block.mixer, "cp_halo_tokens", 0) if cp_mode(block.mixer) == "state passing" else 0
        if shortest_piece < max(halo, 1):
            raise ValueError(
                f"layer {i} ({type(block.mixer).__name__}): the shortest piece under context parallelism is "
                f"{shortest_piece} tokens, but its short convolution needs the previous piece's last {halo} inputs; "
                f"raise {length_key} to at least {cp * halo} or lower parallel.context_parallel_size"
            )


def describe(model: nn.Module) -> dict[str, list[int]]:
    """How each layer runs under CP (cp_mode) -> the layers, for the run's log."""
    modes: dict[str, list[int]] = {}
    for i, block in enumerate(model.blocks):
        modes.setdefault(cp_mode(block.mixer), []).append(i)
    return modes
