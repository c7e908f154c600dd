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
- **Composite** (BST, SCOUT): a mixer made of parts runs each part's own exchange (`cp_forward`). SCOUT's
  local mixer passes its state (or a sliding window's halo) and its checkpoint attention all-gathers only the
  checkpoints' keys and values (T / S of them); BST's SSM passes its state (its outputs corrected, linear in
  it) and its block attention takes a halo of the previous piece's inputs and SSM outputs.
- **Gathered** (BST and SCOUT on packed documents or with Ulysses inside the pieces): the whole sequence is
  all-gathered and every rank runs the mixer on it, keeping its own piece of the output. Exact, but with no
  compute or activation saving for those layers: their checkpoints and blocks sit at each document's own
  positions, which their exchanges do not follow yet. The run's console and train.log say which layers do
  this.

Packed documents (models/documents.py, `cu_seqlens` over the whole rows): a state must stop at every document
boundary, across ranks too (`PieceDocuments`). Each piece runs its documents from a fresh state through the
mixer's packed path, then recomputes only its head (the tokens continuing a document begun in an earlier
piece) from the state it received. The state a piece passes on is that of its rows' last documents: where one
starts inside the piece (or inside the halo its own run reads), a fresh run from that start gives it and the
scan over ranks drops the carry for that row; elsewhere it is the piece's own contribution as above. Attention
reads each document's keys from the earlier pieces (varlen attention with more keys than queries).

With Ulysses inside each piece (SP x CP): attention's all-gather runs inside DistributedAttention on its heads'
share, and mixers whose exchange runs on their heads (`cp_core`: mLSTM, HGRN2, Gated DeltaNet) pass the state
of that share after Ulysses' all-to-all; the others run gathered over the sp x cp ranks.

Like Ulysses, the wrapper is applied from outside by swapping the mixer's class for a subclass, so parameter
names and checkpoints do not change.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.distributed as dist
from torch import nn

from models.documents import Documents, per_document
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


def select_rows(keep: torch.Tensor, state, other):
    """Per batch row (dim 0 of every tensor of a state): `state`'s where keep (B,) is True, else `other`'s."""
    tensors = [torch.where(keep.to(a.device).view(-1, *[1] * (a.dim() - 1)), a, b)
               for a, b in zip(flatten_state(state), flatten_state(other), strict=True)]
    return unflatten_state(state, tensors)


def take_rows(state, rows: torch.Tensor):
    """The rows `rows` of a state (every tensor's dim 0)."""
    return unflatten_state(state, [t.index_select(0, rows) for t in flatten_state(state)])


class PieceDocuments:
    """Packed documents (models/documents.py, over whole rows of T tokens) as CP rank `rank` of `size` sees
    them: its piece of P = T / size tokens of each row. `local`: the piece's rows as packed documents of their
    own (a row's piece starts one), on which every mixer's packed path runs from a fresh state. `head` (B,):
    the tokens at the piece's start that continue a document begun in an earlier piece (0 where a document
    starts at the piece's start); only they read a state from the ranks before.

    For each rank j, `cut[j]` (B,): whether a document starts inside the span rank j's own run covers (its
    piece, with `halo` tokens of the previous piece in front for a middle rank), so that the state at the
    piece's end does not depend on anything before that span; then `own_length[j]` tokens, from the last such
    start to the piece's end, run from a fresh state give it. Every rank derives every rank's values from
    the same cu_seqlens, so the scan over ranks needs no extra exchange."""

    def __init__(self, docs: Documents, rank: int, size: int, halo: int):
        self.length = piece = docs.length // size
        starts = docs.position_ids == 0  # (B, T): where a document starts
        self.cut, self.own_length = [], []
        for j in range(size):
            span = starts[:, j * piece - (halo if 0 < j < size - 1 else 0):(j + 1) * piece]
            last = span.shape[1] - 1 - span.flip(1).int().argmax(1)  # the last start in the span (if any)
            self.cut.append(span.any(1))
            self.own_length.append(torch.where(self.cut[j], span.shape[1] - last, piece))
        mine = starts[:, rank * piece:(rank + 1) * piece]
        self.head = torch.where(mine.any(1), mine.int().argmax(1), piece)
        bounds = mine.flatten().clone()
        bounds[::piece] = True
        cu = torch.cat([bounds.nonzero()[:, 0], torch.tensor([bounds.numel()])])
        self.local = Documents.from_cu_seqlens(cu, docs.batch, piece, docs.device)
        self.docs, self.rank = docs, rank

    def attention(self, lo: int) -> tuple[torch.Tensor, ...]:
        """For this piece's queries reading the keys of positions lo .. end of the piece (flattened (B, end - lo)):
        which keys are kept (flat indices: those of documents the piece's queries belong to), the RoPE position
        of every query and kept key, and varlen attention's layouts (cu_seqlens of queries and of keys, the
        longest of each): each document's queries are the last of its keys, as flash-attn aligns them."""
        begin, end = self.rank * self.length, (self.rank + 1) * self.length
        positions = self.docs.position_ids
        doc = (positions == 0).cumsum(1)  # (B, T) document index within the row
        keep = doc[:, lo:end] >= doc[:, begin:begin + 1]  # keys of documents that reach the piece
        rows = torch.arange(doc.shape[0])[:, None]
        key_doc = (rows * (doc.max() + 1) + doc[:, lo:end])[keep]  # (row, document) of every kept key
        query_doc = (rows * (doc.max() + 1) + doc[:, begin:end]).flatten()

        def layout(ids):
            _, counts = torch.unique_consecutive(ids, return_counts=True)
            cu = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
            return cu.to(self.docs.device, torch.int32), int(counts.max())

        device = self.docs.device
        return (keep.flatten().nonzero()[:, 0].to(device), positions[:, begin:end].flatten().to(device),
                positions[:, lo:end][keep].to(device), *layout(query_doc), *layout(key_doc))


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

    def gather_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T / (sp cp), ...) -> (B, T, ...): every rank's tokens of the sequence's group (sp x cp)."""
        return AllGather.apply(x, 1, self.seq_group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the CP group; differentiable."""
        return AllReduceSum.apply(x, self.group)

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

    def before(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """x (B, T/cp, ...) with the n tokens before this piece in front (fewer near the sequence's start): the
        previous piece's halo when n fits in it, else every piece all-gathered."""
        if n <= x.shape[1]:
            return self.with_previous(x, n, dim=1) if n else x
        start = self.offset(x.shape[1])
        return self.all_gather(x, dim=1)[:, max(0, start - n):start + x.shape[1]]

    @staticmethod
    def tie(y: torch.Tensor, *exchanged: torch.Tensor) -> torch.Tensor:
        """y, made to depend on every exchanged tensor (zero gradient where unused), so that every rank runs each
        exchange's backward collective whatever it read."""
        return Tie.apply(y, *exchanged)

    def offset(self, piece_length: int) -> int:
        """The absolute position of this rank's piece's first token."""
        return self.rank * piece_length

    def pieces(self, docs: Documents, halo: int) -> PieceDocuments:
        """This rank's view of a batch's packed documents (made once per forward and halo, for every layer)."""
        if getattr(self, "_pieces", (None,))[0] is not docs:
            self._pieces = (docs, {})
        cache = self._pieces[1]
        if halo not in cache:
            cache[halo] = PieceDocuments(docs, self.rank, self.size, halo)
        return cache[halo]

    def run(self, mixer: nn.Module, x: torch.Tensor, docs: Documents | None = None) -> torch.Tensor:
        """The mixer's output for this rank's tokens x (B, T / (sp cp), D). `docs`: packed documents over the
        whole rows."""
        mode = cp_mode(mixer, self.sp is not None, packed=docs is not None)
        if mode == "attention":  # keys and values across pieces, inside Ulysses' head split if any
            local = lambda q, k, v: mixer.cp_mix(q, k, v, self, docs)  # noqa: E731
            heads = mixer.project(x)
            return mixer.output(local(*heads) if self.sp is None else self.sp.attention(local, *heads), x)
        if mode == "state passing":
            return self.pass_state(mixer, x, docs)
        if mode == "relay":
            return self.relay(mixer, x, docs)
        if mode == "composite":
            return mixer.cp_forward(x, self)
        return self.gathered(mixer, x, docs)

    def gathered(self, mixer: nn.Module, x: torch.Tensor, docs: Documents | None = None) -> torch.Tensor:
        """The mixer run on the whole sequence on every rank of the sequence's group; this rank's piece of it."""
        t = x.shape[1]
        whole = self.gather_sequence(x)
        y = mixer.own_forward(whole)[0] if docs is None else mixer.own_packed(whole, docs)
        return y[:, self.seq_rank * t:(self.seq_rank + 1) * t]

    def pass_state(self, mixer: nn.Module, x: torch.Tensor, docs: Documents | None = None) -> torch.Tensor:
        # What the exchange runs on: a mixer's whole forward on its piece, or (`cp_core`) its sequence mixing on
        # the projections of its heads, after Ulysses' all-to-all when the piece is split further.
        on_heads = hasattr(mixer, "cp_core")
        if on_heads:
            inputs = mixer.project(x)
            if self.sp is not None:
                inputs = [self.sp.seq_to_heads(t) for t in inputs]
            run = lambda parts, state=None: mixer.cp_core(parts, state, self.sp)  # noqa: E731
            zeros = mixer.cp_zeros(inputs)
        else:
            inputs, run = x, mixer.own_forward
            zeros = mixer.init_state(x.shape[0], x.device, x.dtype)
        first, last, middle = self.rank == 0, self.rank == self.size - 1, 0 < self.rank < self.size - 1
        halo = mixer.cp_halo_tokens if self.size > 2 else 0  # for the middle pieces' own runs and transitions
        tail, exchanged = None, []
        if halo:
            tails = self.gather_flat([t[:, -halo:] for t in (inputs if on_heads else [inputs])])
            if middle:
                tail = tails[self.rank - 1] if on_heads else tails[self.rank - 1][0]
            exchanged = [t for row in tails for t in row]
        piece = None if docs is None else self.pieces(docs, halo)
        if piece is not None:  # every document from a fresh state first: exact but for the pieces' heads
            y = mixer.cp_core(inputs, None, self.sp, piece.local)[0] if on_heads else mixer.own_packed(x, piece.local)
            empty = lambda rows, sub, sub_tail: mixer.cp_empty(sub, sub_tail)  # noqa: E731
            own = zeros if last else self.own_states(run, inputs, tail, piece, zeros, empty)
        elif first:
            y, own = run(inputs)  # from the sequence's start: its final state is the true one
        elif last:  # nobody reads the last piece's contribution: zeros of the state's shapes
            own = zeros
        else:
            own = run(inputs, mixer.cp_empty(inputs, tail))[1]
        sent = flatten_state(own)
        n = len(sent)
        if self.size > 2:  # the middle pieces pass their predecessors' state on through their transitions
            sent += list(mixer.cp_transition(inputs, tail, self.sp))
        rows = self.gather_flat(sent)
        exchanged += [t for row in rows for t in row]
        owns = [unflatten_state(own, row[:n]) for row in rows]
        if not first:
            state = start_state(mixer, owns, [row[n:] for row in rows], self.rank,
                                None if piece is None else piece.cut)
            y = run(inputs, state)[0] if piece is None else self.finish_heads(y, run, inputs, state, piece)
        # Every rank's output depends on every exchanged tensor (with zero gradient where unused), so every rank
        # runs each exchange's backward collective.
        y = Tie.apply(y, *exchanged)
        if on_heads:
            y = mixer.output(y if self.sp is None else self.sp.heads_to_seq(y), x)
        return y

    @staticmethod
    def own_states(run, inputs, tail, piece: PieceDocuments, zeros, start):
        """A piece's own contribution to the state at its end, on packed documents, row by row: where a document
        starts in the span its own run covers, the state of a fresh run from the last such start (into the halo
        in front, if it starts there); elsewhere the run of the whole piece from `start(rows, inputs, tail)` of
        those rows. Rows are grouped by that length, one call per group (the mixers are ZeRO-3 leaf modules,
        so the number of calls may differ across ranks)."""
        rank = piece.rank
        cut, lengths = piece.cut[rank], piece.own_length[rank]
        span = inputs if tail is None else each(lambda t, h: torch.cat([h, t], dim=1), inputs, tail)
        out = flatten_state(zeros)
        for fresh, length in sorted(set(zip(cut.tolist(), lengths.tolist()))):
            rows = ((cut == fresh) & (lengths == length)).nonzero()[:, 0].to(out[0].device)
            if fresh:
                state = run(each(functools.partial(pick_rows, rows=rows, last=length), span))[1]
            else:
                sub = each(functools.partial(pick_rows, rows=rows), inputs)
                picked_tail = None if tail is None else each(functools.partial(pick_rows, rows=rows), tail)
                state = run(sub, start(rows, sub, picked_tail))[1]
            out = [o.index_copy(0, rows, s.to(o.dtype)) for o, s in zip(out, flatten_state(state), strict=True)]
        return unflatten_state(zeros, out)

    @staticmethod
    def finish_heads(y, run, inputs, state, piece: PieceDocuments):
        """Packed outputs y with each row's head (the tokens continuing an earlier piece's document) recomputed
        from the state the piece starts with."""
        h = int(piece.head.max())
        if not h:
            return y
        y_head = run(each(lambda t: t[:, :h], inputs), state)[0]
        keep = (torch.arange(h)[None] < piece.head[:, None]).to(y.device)
        keep = keep.view(*keep.shape, *[1] * (y.dim() - 2))
        return torch.cat([torch.where(keep, y_head, y[:, :h]), y[:, h:]], dim=1)

    def relay(self, mixer: nn.Module, x: torch.Tensor, docs: Documents | None = None) -> torch.Tensor:
        """For a mixer whose state has no transition to scan (MoM: routed memories with their own convolution
        halos and capacity counts): the state is handed on piece by piece, rank j running its piece from the
        state rank j - 1 sent. Exact, and memory is split as for state passing, but the pieces run one after
        another (at CP = 2 this is the same exchange as state passing). A mixer whose loss term reads every
        token (MoM's load balancing) computes it over all pieces (`cp_aux_loss`). On packed documents the state
        sent is each row's last document's, and only the heads of the rows read the state received."""
        template = mixer.init_state(x.shape[0], x.device, x.dtype)  # the state's structure and shapes
        piece = None if docs is None else self.pieces(docs, 0)

        def finish(state, final: bool):  # this piece's output (and final state) from the one received
            if piece is None:
                return mixer.own_forward(x, state)
            y = mixer.own_packed(x, piece.local)
            if state is not None:
                y = self.finish_heads(y, mixer.own_forward, x, state, piece)
            resume = lambda rows, sub, tail: take_rows(state, rows)  # noqa: E731
            return y, (self.own_states(mixer.own_forward, x, None, piece, template, resume) if final else None)

        state, exchanged = None, []
        for j in range(self.size - 1):
            if self.rank == j:
                y, final = finish(state, True)
            rows = self.gather_flat(flatten_state(final if self.rank == j else template))
            exchanged += rows[j]
            if self.rank == j + 1:
                state = unflatten_state(template, list(rows[j]))
        if self.rank == self.size - 1:
            y = finish(state, False)[0]
        if hasattr(mixer, "cp_aux_loss"):
            mixer.aux_loss = mixer.cp_aux_loss(x, self.all_reduce)
        return Tie.apply(y, *exchanged)


def pick_rows(t: torch.Tensor, rows: torch.Tensor, last: int | None = None) -> torch.Tensor:
    """The rows `rows` of t (B, T, ...), their last `last` tokens if given."""
    t = t.index_select(0, rows)
    return t if last is None else t[:, -last:]


def each(fn, inputs, *others):
    """fn over the tensors a mixer's exchange runs on (a list of head projections, or one tensor), zipped with
    `others` of the same form."""
    if isinstance(inputs, torch.Tensor):
        return fn(inputs, *others)
    return [fn(*ts) for ts in zip(inputs, *others, strict=True)]


class Tie(torch.autograd.Function):
    """y unchanged; the other inputs get zero gradients (see pass_state)."""

    @staticmethod
    def forward(ctx, y, *others):
        ctx.others = [(t.shape, t.dtype, t.device) for t in others]
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return grad, *(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.others)


def start_state(mixer: nn.Module, owns: list, transitions: list | None, rank: int, cuts: list | None = None):
    """The state piece `rank` starts from, given every piece's own contribution (the first piece's is its
    true final state) and transition: the scan over the ranks before it. `cuts` (packed documents, per rank
    (B,)): rows where a document starts in piece j take its own state, the state before it cut off."""
    state = owns[0]
    for j in range(1, rank):
        carried = mixer.cp_carry(state, owns[j], transitions[j])
        state = carried if cuts is None else select_rows(cuts[j], owns[j], carried)
    return state


class OwnPaths:
    """Mixin giving `ContextParallel.run` a mixer's own forward and packed path: on a composite mixer's parts
    (`cp_parts`) alone, whose forward stays their own, and under ContextParallelMixer, whose forward replaces it."""

    def own_forward(self, x: torch.Tensor, state=None):
        """The mixer's own forward on whole pieces (called inside this module's forward, where ZeRO-3 has
        gathered its parameters)."""
        return super().forward(x, state)

    def own_packed(self, x: torch.Tensor, docs: Documents) -> torch.Tensor:
        """The mixer's own path for packed documents (models/block.py), on whole pieces or rows."""
        if hasattr(super(), "forward_packed"):
            return super().forward_packed(x, docs)
        y = per_document(lambda xs: super(OwnPaths, self).forward(xs)[0], x, docs)
        if hasattr(self, "aux_loss_of"):  # a loss over the real tokens, not the padding
            self.aux_loss = self.aux_loss_of(x)
        return y


class ContextParallelMixer(OwnPaths):
    """Mixin placed before a mixer's class: its forward runs the mixer through `ContextParallel.run`."""

    cp: ContextParallel
    splits_sequence = True  # train/sequence_parallel.py `unsplit` takes it off

    def forward(self, x: torch.Tensor, state=None, docs: Documents | None = None):
        if state is not None:
            raise ValueError("context parallelism is for training; decode with parallel.context_parallel_size=1")
        return self.cp.run(self, x, docs), None

    def forward_packed(self, x: torch.Tensor, docs: Documents) -> torch.Tensor:
        # Through the module's call, so that ZeRO-3 gathers this leaf module's parameters when it starts, on every
        # rank at the same point (a direct call would fetch each on first access, out of step across ranks).
        return self(x, docs=docs)[0]


def wrap_mixer(mixer: nn.Module, cp: ContextParallel) -> None:
    """Swaps the mixer's class for its CP subclass (parameter names and checkpoints do not change); the parts a
    composite mixer runs through their own exchanges get their own paths only."""
    cls = type(mixer)
    mixer.__class__ = type(f"ContextParallel{cls.__name__}", (ContextParallelMixer, cls), {})
    mixer.cp = cp
    for part in getattr(mixer, "cp_parts", list)():
        part.__class__ = type(f"Own{type(part).__name__}", (OwnPaths, type(part)), {})


def cp_mode(mixer: nn.Module, with_sp: bool = False, packed: bool = False) -> str:
    """How a mixer runs under CP (with Ulysses inside the pieces or not, on packed documents or not):
    'attention', 'state passing', 'relay', 'composite' or 'gathered' (module docstring)."""
    if hasattr(mixer, "cp_mix"):
        return "attention"
    if hasattr(mixer, "cp_core") if with_sp else hasattr(mixer, "cp_carry"):
        return "state passing"
    if hasattr(mixer, "cp_forward") and not with_sp and not packed:
        return "composite"
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
        wrap_mixer(block.mixer, cp)
        for param in getattr(block.mixer, "external_parameters", list)():
            if hasattr(param, "ds_id"):  # partitioned by ZeRO-3
                register_external_parameter(block.mixer, param)
    set_z3_leaf_modules(model, [ContextParallelMixer])


def check_context_parallel(model: nn.Module, cp: int, shortest_piece: int, length_key: str, sp: int) -> None:
    """Raises ValueError naming the problem and the fix when the model cannot run over cp pieces."""
    for i, block in enumerate(model.blocks):
        mode = cp_mode(block.mixer, sp > 1)
        passing = [block.mixer] if mode == "state passing" else []
        if mode == "composite":  # its parts run their own exchanges
            passing = [m for m in getattr(block.mixer, "cp_parts", list)() if cp_mode(m) == "state passing"]
        halo = max((getattr(m, "cp_halo_tokens", 0) for m in passing), default=0)
        if shortest_piece < halo:
            raise ValueError(
                f"layer {i} ({type(block.mixer).__name__}): the shortest piece under context parallelism is "
                f"{shortest_piece} tokens, but its short convolution needs the previous piece's last {halo} inputs; "
                f"raise {length_key} to at least {cp * halo} or lower parallel.context_parallel_size"
            )


def describe(model: nn.Module, packed: bool) -> dict[str, list[int]]:
    """How each layer runs under CP (cp_mode) -> the layers, for the run's log."""
    modes: dict[str, list[int]] = {}
    for i, block in enumerate(model.blocks):
        modes.setdefault(cp_mode(block.mixer, block.mixer.cp.sp is not None, packed), []).append(i)
    return modes
