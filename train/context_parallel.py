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
  short causal convolution's state is the previous piece's last d_conv - 1 inputs: it comes with the state,
  and for CP > 2 the middle pieces also all-gather it first (a halo), as part of the empty state their own
  contribution starts from.
  Then rank r runs its piece again from the state it received: **recomputation** rather than correcting the
  outputs, because every mixer's `forward(x, state)` is already exact on every kernel path, while a
  correction is not linear for the mLSTM (its normaliser max(|n.q|, exp(-m)) depends on the state) and
  needs the per-token decay products for the delta rule. Cost: rank 0 runs once (its final state comes
  with its output), the last rank once, the ranks between twice. The mixers' `cp_*` methods say what their
  state does; gradients flow back through the same all-gather (its backward is a reduce-scatter).
- **Attention**: the keys and values of every piece are all-gathered (Llama-3's CP); each query reads them
  with the causal mask at its absolute position. A sliding window that fits in a piece gathers only the
  previous piece's last window - 1 keys and values (a halo).
- **Relay** (MoM): its state (routed memories, each with its own convolution halo and capacity count) has no
  transition to scan, so it is handed on piece by piece: exact and memory-split, but the pieces run one after
  another (at CP = 2 the same exchange as state passing). The load-balancing loss is taken over all pieces.
- **Gathered** (BST, SCOUT): the whole sequence is all-gathered and every rank runs the mixer on it, keeping
  its own piece of the output. Exact, but with no compute or activation saving for those layers: their
  continuation from a state runs token by token, and their block-wise contexts need per-family state passing
  that is not written yet. The run's console and train.log say which layers do this.

With Ulysses inside each piece (SP x CP): attention's all-gather runs inside DistributedAttention on its heads'
share, and mixers whose exchange runs on their heads (`cp_core`: mLSTM, HGRN2, Gated DeltaNet) pass the state
of that share after Ulysses' all-to-all; the others run gathered over the sp x cp ranks.

Like Ulysses, the wrapper is applied from outside by swapping the mixer's class for a subclass, so parameter
names and checkpoints do not change.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from train.sequence_parallel import AllGather, AllReduceSum, SequenceParallel


def flatten_state(state) -> list[torch.Tensor]:
    """The tensors of a mixer state (a tensor, or tuples and dataclasses of them, nested; None fields skipped),
    in a fixed order."""
    if isinstance(state, torch.Tensor):
        return [state]
    if state is None:
        return []
    if dataclasses.is_dataclass(state):
        state = [getattr(state, f.name) for f in dataclasses.fields(state)]
    return [t for part in state for t in flatten_state(part)]


def unflatten_state(template, tensors: list[torch.Tensor]):
    """The inverse of flatten_state: `template`'s structure filled with `tensors` (consumed from the front)."""
    if isinstance(template, torch.Tensor):
        return tensors.pop(0)
    if template is None:
        return None
    if dataclasses.is_dataclass(template):
        return type(template)(*(unflatten_state(getattr(template, f.name), tensors)
                                for f in dataclasses.fields(template)))
    return type(template)(unflatten_state(part, tensors) for part in template)


class ContextParallel:
    """One CP group and the exchanges a mixer makes on it (see the module docstring). `sp`: the Ulysses split
    inside each piece, if any; `seq_group`: every rank holding a share of the same sequences (sp x cp)."""

    def __init__(self, group, seq_group=None, sp: SequenceParallel | None = None):
        self.group, self.sp = group, sp
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.seq_group = seq_group or group
        self.seq_rank = dist.get_rank(self.seq_group)

    def all_gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Every rank's piece, in rank order along `dim`: by default (B, T/cp, ...) -> (B, T, ...)."""
        return AllGather.apply(x, dim, self.group)

    def gather_flat(self, tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """[t_0, t_1, ...] on every rank -> per rank j, [t_0 of rank j, t_1 of rank j, ...]: one all-gather of
        one fp32 buffer (exact for bf16 too), so its backward is one collective that every rank makes in the
        same place whatever its graph; differentiable."""
        flat = torch.cat([t.float().flatten() for t in tensors])
        if torch.is_grad_enabled() and not flat.requires_grad:  # zeros sent: still join the backward's collective
            flat.requires_grad_()
        gathered = self.all_gather(flat[None], dim=0)  # (cp, total)
        sizes = [t.numel() for t in tensors]
        return [[piece.view(t.shape).to(t.dtype) for piece, t in zip(row.split(sizes), tensors)] for row in gathered]

    def with_previous(self, x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
        """x with the previous piece's last n entries along `dim` in front (a halo; the first piece: x alone,
        still joining the exchange and its backward)."""
        ends = self.all_gather(x.narrow(dim, x.shape[dim] - n, n)[None], dim=0)  # (cp, ...)
        return Tie.apply(x, ends) if self.rank == 0 else torch.cat([ends[self.rank - 1], x], dim=dim)

    def offset(self, piece_length: int) -> int:
        """The absolute position of this rank's piece's first token."""
        return self.rank * piece_length

    def run(self, mixer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The mixer's output for this rank's tokens x (B, T / (sp cp), D)."""
        mode = cp_mode(mixer, self.sp is not None)
        if mode == "attention":  # keys and values across pieces, inside Ulysses' head split if any
            local = lambda q, k, v: mixer.cp_mix(q, k, v, self)  # noqa: E731
            heads = mixer.project(x)
            return mixer.output(local(*heads) if self.sp is None else self.sp.attention(local, *heads), x)
        if mode == "state passing":
            return self.pass_state(mixer, x)
        if mode == "relay":
            return self.relay(mixer, x)
        t = x.shape[1]  # gathered: the whole sequence on every rank of the sequence's group
        whole = AllGather.apply(x, 1, self.seq_group)
        return mixer.own_forward(whole)[0][:, self.seq_rank * t:(self.seq_rank + 1) * t]

    def pass_state(self, mixer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # What the exchange runs on: a mixer's whole forward on its piece, or (`cp_core`) its sequence mixing on
        # the projections of its heads, after Ulysses' all-to-all when the piece is split further.
        on_heads = hasattr(mixer, "cp_core")
        if on_heads:
            inputs = mixer.project(x)
            if self.sp is not None:
                inputs = [self.sp.seq_to_heads(t) for t in inputs]
            core = lambda state=None: mixer.cp_core(inputs, state, self.sp)  # noqa: E731
            zeros = mixer.cp_zeros(inputs)
        else:
            inputs, core = x, (lambda state=None: mixer.own_forward(x, state))
            zeros = mixer.init_state(x.shape[0], x.device, x.dtype)
        first, last, middle = self.rank == 0, self.rank == self.size - 1, 0 < self.rank < self.size - 1
        tail, exchanged = None, []
        if self.size > 2 and mixer.cp_halo_tokens:  # for the middle pieces' own runs and transitions
            tails = self.gather_flat([t[:, -mixer.cp_halo_tokens:] for t in (inputs if on_heads else [inputs])])
            if middle:
                tail = tails[self.rank - 1] if on_heads else tails[self.rank - 1][0]
            exchanged = [t for row in tails for t in row]
        if first:
            y, own = core()  # from the sequence's start: its final state is the true one
        elif last:  # nobody reads the last piece's contribution: zeros of the state's shapes
            own = zeros
        else:
            own = core(mixer.cp_empty(inputs, tail))[1]
        sent = flatten_state(own)
        n = len(sent)
        if self.size > 2:  # the middle pieces pass their predecessors' state on through their transitions
            sent += list(mixer.cp_transition(inputs, tail, self.sp))
        rows = self.gather_flat(sent)
        exchanged += [t for row in rows for t in row]
        owns = [unflatten_state(own, row[:n]) for row in rows]
        if not first:
            y = core(start_state(mixer, owns, [row[n:] for row in rows], self.rank))[0]
        # Every rank's output depends on every exchanged tensor (with zero gradient where unused), so every rank
        # runs each exchange's backward collective.
        y = Tie.apply(y, *exchanged)
        if on_heads:
            y = mixer.output(y if self.sp is None else self.sp.heads_to_seq(y), x)
        return y

    def relay(self, mixer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """For a mixer whose state has no transition to scan (MoM: routed memories with their own convolution
        halos and capacity counts): the state is handed on piece by piece, rank j running its piece from the
        state rank j - 1 sent. Exact, and memory is split as for state passing, but the pieces run one after
        another (at CP = 2 this is the same exchange as state passing). A mixer whose loss term reads every
        token (MoM's load balancing) computes it over all pieces (`cp_aux_loss`)."""
        template = mixer.init_state(x.shape[0], x.device, x.dtype)  # the state's structure and shapes
        state, exchanged = None, []
        for j in range(self.size - 1):
            if self.rank == j:
                y, final = mixer.own_forward(x, state)
            rows = self.gather_flat(flatten_state(final if self.rank == j else template))
            exchanged += rows[j]
            if self.rank == j + 1:
                state = unflatten_state(template, list(rows[j]))
        if self.rank == self.size - 1:
            y = mixer.own_forward(x, state)[0]
        if hasattr(mixer, "cp_aux_loss"):
            mixer.aux_loss = mixer.cp_aux_loss(x, lambda t: AllReduceSum.apply(t, self.group))
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


def cp_mode(mixer: nn.Module, with_sp: bool = False) -> str:
    """How a mixer runs under CP (with Ulysses inside the pieces or not): 'attention', 'state passing',
    'relay' or 'gathered' (module docstring)."""
    if hasattr(mixer, "cp_mix"):
        return "attention"
    if hasattr(mixer, "cp_core") if with_sp else hasattr(mixer, "cp_carry"):
        return "state passing"
    return "relay" if getattr(mixer, "cp_relay", False) and not with_sp else "gathered"


def apply_context_parallel(model: nn.Module, group, seq_group=None, sp_group=None) -> None:
    """Wraps every mixer. Each is also a ZeRO-3 leaf module: its parameters are gathered once when its forward
    (and backward) starts, not by each submodule. The ranks call submodules at different points of the
    exchange (rank 0 before the all-gather, the others after), and ZeRO-3's per-submodule gathers are
    collectives that would then be out of step across ranks. For the same reason parameters a mixer reads from
    other layers (`external_parameters`, HGRN2's lower bounds) are registered with it, so ZeRO-3 gathers them
    with its own rather than on first access."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter
    from deepspeed.utils import set_z3_leaf_modules

    cp = ContextParallel(group, seq_group, None if sp_group is None else SequenceParallel(sp_group))
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
    for i, block in enumerate(model.blocks):
        halo = getattr(block.mixer, "cp_halo_tokens", 0) if cp_mode(block.mixer, sp > 1) == "state passing" else 0
        if shortest_piece < halo:
            raise ValueError(
                f"layer {i} ({type(block.mixer).__name__}): the shortest piece under context parallelism is "
                f"{shortest_piece} tokens, but its short convolution needs the previous piece's last {halo} inputs; "
                f"raise {length_key} to at least {cp * halo} or lower parallel.context_parallel_size"
            )


def describe(model: nn.Module) -> dict[str, list[int]]:
    """How each layer runs under CP (cp_mode) -> the layers, for the run's log."""
    modes: dict[str, list[int]] = {}
    for i, block in enumerate(model.blocks):
        modes.setdefault(cp_mode(block.mixer, block.mixer.cp.sp is not None), []).append(i)
    return modes
