"""DeepSpeed-Ulysses sequence parallelism around every token mixer.

Each rank of a sequence-parallel (SP) group holds T / sp tokens of every sequence. The Ulysses split of a
mixer has three parts: `project(x)` (token-local: projections to per-head tensors, each (B, T, H, ...)),
`mix(*heads)` (sequence mixing on whole sequences, independent across heads, including any short causal
convolution) and `output(y, x)` (token-local again). Around `mix`, one all-to-all turns (local tokens, all
heads) into (all tokens, local heads) and a second turns the result back, so no recurrent state ever
crosses a shard. mLSTM and HGRN2 offer exactly these three methods. The other mixers write
`sp_forward(x, sp, docs)` from the collectives of `SequenceParallel`: attention hands q, k, v to DeepSpeed's
DistributedAttention, Mamba-2 sends its B/C groups with its heads, Mamba-1 splits channels and sums its
partial x_proj, MoM gathers the whole sequence for its router, BST gathers the SSM outputs its context
states are made of, SCOUT nests its local mixer's split; Gated DeltaNet sends its value heads with the
query/key heads they read.

Packed documents (models/documents.py): `cu_seqlens` stays over the whole rows, and the part of a mixer
that sees whole rows (`mix`, or the middle of `sp_forward`) runs on each document alone through
`per_document`, with any collective inside it called identically on every rank of the group (the ranks
hold the same rows, so the same documents).

The wrapper is applied from outside, as FSDP2's `fully_shard` does: the mixer's class is swapped for a
subclass whose forward runs the split, so parameter names (and so checkpoints) do not change.
"""

from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from models.documents import per_document


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """all_to_all over dim 0, which has one slice per rank of the group."""
    x = x.contiguous()
    out = torch.empty_like(x)  # after contiguous(): empty_like would copy a permuted layout's strides
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """(B, T/sp, H, ...) -> (B, T, H/sp, ...): gather the sequence, scatter the heads."""
    sp = dist.get_world_size(group)
    b, t, h, *rest = x.shape
    x = x.reshape(b, t, sp, h // sp, *rest).movedim(2, 0)  # (sp: head chunk, B, T/sp, H/sp, ...)
    x = _all_to_all(x, group)  # (sp: source rank = token chunk, B, T/sp, H/sp, ...)
    return x.movedim(0, 1).reshape(b, sp * t, h // sp, *rest)


def _heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """(B, T, H/sp, ...) -> (B, T/sp, H, ...): the inverse of _seq_to_heads."""
    sp = dist.get_world_size(group)
    b, t, h, *rest = x.shape
    x = x.reshape(b, sp, t // sp, h, *rest).movedim(1, 0)  # (sp: token chunk, B, T/sp, H/sp, ...)
    x = _all_to_all(x, group)  # (sp: source rank = head chunk, B, T/sp, H/sp, ...)
    return x.movedim(0, 2).reshape(b, t // sp, sp * h, *rest)


class SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad, ctx.group), None


class HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad, ctx.group), None


class AllGather(torch.autograd.Function):
    """Concatenates every rank's x along `dim`; backward gives each rank the sum of all ranks' gradients
    for its own piece (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        x = x.contiguous()  # before empty_like, which would copy a permuted layout's strides
        out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, x, group=group)
        return torch.cat(out, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        # A reduce-scatter written as an all-to-all plus a sum: gloo has no reduce_scatter.
        pieces = torch.stack(grad.chunk(dist.get_world_size(ctx.group), dim=ctx.dim))
        return _all_to_all(pieces, ctx.group).sum(0), None, None


class AllReduceSum(torch.autograd.Function):
    """Sum of partial results over the group. Every rank goes on with the sum for its own heads or channels,
    so the gradient of each partial is the sum of all ranks' gradients: an all-reduce again."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class SequenceParallel:
    """One SP group and the autograd-aware collectives a mixer may use on it.

    `run` puts the two all-to-alls around a mixer's `mix`, or calls its `sp_forward(x, sp, docs)`, which builds its
    split from the pieces here (see the module docstring).
    """

    def __init__(self, group):
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)

    def seq_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T/sp, H, ...) -> (B, T, H/sp, ...)."""
        return SeqToHeads.apply(x, self.group)

    def heads_to_seq(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H/sp, ...) -> (B, T/sp, H, ...)."""
        return HeadsToSeq.apply(x, self.group)

    def all_gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Every rank's x, concatenated along dim: by default (B, T/sp, ...) -> (B, T, ...), the whole sequence."""
        return AllGather.apply(x, dim, self.group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group of per-rank partial results (e.g. a projection over each rank's channels)."""
        return AllReduceSum.apply(x, self.group)

    def attention(self, local_attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """DeepSpeed-Ulysses' own layer, DistributedAttention, around local_attention(q, k, v) of whole
        sequences: q (B, T/sp, H, hd), k and v (B, T/sp, H_kv, hd) -> (B, T/sp, H, hd)."""
        from deepspeed.sequence.layer import DistributedAttention

        # Built per call: the layer holds no parameters or buffers, only the group and the split dims.
        return DistributedAttention(local_attention, self.group, scatter_idx=2, gather_idx=1)(q, k, v, batch_dim_idx=0)

    def local(self, n: int) -> slice:
        """The heads (or channels) of n that `seq_to_heads` leaves on this rank: a contiguous share."""
        return slice(self.rank * n // self.size, (self.rank + 1) * n // self.size)

    def run(self, mixer: nn.Module, x: torch.Tensor, docs=None) -> torch.Tensor:
        """The mixer's output for this rank's tokens x (B, T/sp, D). `docs`: packed documents over the whole
        rows (models/documents.py); the part of the mixer that sees whole rows keeps them apart itself
        (`mix_packed`, a varlen kernel) or runs on each document alone."""
        if hasattr(mixer, "sp_forward"):
            return mixer.sp_forward(x, self, docs)
        heads = [self.seq_to_heads(t) for t in mixer.project(x)]
        if docs is None:
            y = mixer.mix(*heads)
        elif hasattr(mixer, "mix_packed"):  # a varlen kernel keeps the documents apart itself
            y = mixer.mix_packed(*heads, docs)
        else:
            y = per_document(mixer.mix, heads, docs)
        return mixer.output(self.heads_to_seq(y), x)


class UlyssesMixer:
    """Mixin placed before a mixer's class: its forward runs the mixer through `SequenceParallel.run`."""

    sp: SequenceParallel
    splits_sequence = True  # `unsplit` takes it off

    def forward(self, x: torch.Tensor, state=None):
        if state is not None:
            raise ValueError("sequence parallelism is for training; decode with parallel.sequence_parallel_size=1")
        return self.sp.run(self, x), None

    def forward_packed(self, x: torch.Tensor, docs):
        return self.sp.run(self, x, docs)


def supports_sequence_parallel(mixer: nn.Module) -> bool:
    sandwich = all(hasattr(mixer, name) for name in ("project", "mix", "output"))
    return hasattr(mixer, "sp_head_counts") and (sandwich or hasattr(mixer, "sp_forward"))


def check_sequence_parallel(model: nn.Module, sp: int) -> None:
    """Raises ValueError naming the layer and the fix when some mixer cannot be split over sp ranks."""
    for i, block in enumerate(model.blocks):
        name = type(block.mixer).__name__
        if not supports_sequence_parallel(block.mixer):
            raise ValueError(f"layer {i} ({name}) does not support sequence parallelism yet; "
                             "set parallel.sequence_parallel_size=1")
        for what, count in block.mixer.sp_head_counts().items():
            if count % sp:
                raise ValueError(
                    f"layer {i} ({name}) has {what}={count}, not divisible by parallel.sequence_parallel_size={sp}; "
                    "Ulysses splits heads over the SP ranks, so choose a size that divides it "
                    "(Megatron's fallback of splitting inside a head is not implemented)"
                )


def apply_sequence_parallel(model: nn.Module, group) -> None:
    sp = SequenceParallel(group)
    for block in model.blocks:
        cls = type(block.mixer)
        block.mixer.__class__ = type(f"Ulysses{cls.__name__}", (UlyssesMixer, cls), {})
        block.mixer.sp = sp


@contextmanager
def unsplit(model: nn.Module):
    """The model's own mixers for the duration: every rank runs whole sequences (in-training eval), under SP or CP."""
    wrapped = [(b.mixer, type(b.mixer)) for b in model.blocks if getattr(b.mixer, "splits_sequence", False)]
    for mixer, cls in wrapped:
        mixer.__class__ = cls.__bases__[1]  # (UlyssesMixer or ContextParallelMixer, the mixer's class)
    try:
        yield model
    finally:
        for mixer, cls in wrapped:
            mixer.__class__ = cls


def shard_sequence(batch: dict[str, torch.Tensor], sp_rank: int, sp: int) -> dict[str, torch.Tensor]:
    """This rank's contiguous T / sp tokens of every (B, T) tensor of the micro batch."""
    t = batch["input_ids"].shape[1]
    if t % sp:
        raise ValueError(f"sequence length {t} is not divisible by parallel.sequence_parallel_size={sp}")
    size = t // sp
    # Packed documents' cu_seqlens stays whole: the mixers see whole rows (CausalLM.forward's row_length).
    return {k: v if k == "cu_seqlens" else v[:, sp_rank * size:(sp_rank + 1) * size] for k, v in batch.items()}


def loss_scale(zero_stage: int, sp: int) -> float:
    """Factor on each rank's mean loss so that gradients equal those of the unsplit sequence.

    DeepSpeed reduces gradients over data x sequence ranks but divides by the data-parallel size only in
    ZeRO 0/1/2 (a sum over SP ranks; upstream issues 5248 and 6841), while ZeRO-3's reduce-scatter divides
    by the whole group (a mean). The mean over SP ranks of their local means is the global mean, since
    every rank holds the same number of tokens.
    """
    return 1.0 if zero_stage == 3 else 1.0 / sp
