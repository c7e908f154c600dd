"""Packed documents: the one carrier of document boundaries from the data path to every mixer.

A packed batch (B, T) holds several documents per row. Its boundaries travel as `cu_seqlens`, the
cumulative document lengths over the flattened B*T tokens (flash-attn's varlen and flash-linear-attention's
layout): [0, ..., B*T], strictly increasing, every row end B_i*T among them (a document never spans two
rows). `Documents` checks that once, in CausalLM.forward, and derives what the mixers need: per-token
positions (RoPE restarts at each document), each token's document index `seq_idx` (for the kernels that
keep documents apart themselves: mamba-ssm's SSD, causal-conv1d) and the gather indices of `per_document`.

`per_document(fn, x, docs)` runs a token mixer (or, under sequence parallelism, the part of it that sees whole
rows) on each document alone, exactly: the documents are cut out
and right-padded into a few batches of equal length (one per power of two, so padding at most doubles the
tokens; always ceil(log2(T)) + 1 calls, the same on every rank), `fn` runs on each batch as on ordinary fresh sequences,
and the outputs are put back. Padding sits after a document's last token, so a causal mixer's outputs on
real tokens never see it; whatever kernel `fn` takes (reference, Triton, CUDA packages) takes it here too.
"""

from dataclasses import dataclass
from functools import cached_property

import torch

FIELD = "cu_seqlens"  # the batch field (data/batches.py) and the CausalLM.forward argument


class DocumentsError(ValueError):
    """Inconsistent document boundaries in a batch."""


@dataclass(frozen=True)
class Documents:
    cu_seqlens: torch.Tensor  # (N + 1,) int64 on the CPU, over the flattened (B * T) tokens
    batch: int
    length: int
    device: torch.device | str = "cpu"  # where the layers run

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, batch: int, length: int, device="cpu") -> "Documents":
        """Checks the boundaries before any kernel sees them; raises DocumentsError naming the field."""
        cu = torch.as_tensor(cu_seqlens)
        total = batch * length
        where = f"batch field '{FIELD}' (cumulative document lengths over the {batch} x {length} tokens)"
        if cu.ndim != 1 or cu.numel() < 2 or cu.dtype.is_floating_point or cu.dtype == torch.bool:
            raise DocumentsError(f"{where} must be a 1-D integer tensor [0, ..., {total}], got shape "
                                 f"{tuple(cu.shape)} {cu.dtype}")
        cu = cu.to("cpu", torch.int64)
        if int(cu[0]) != 0 or int(cu[-1]) != total:
            raise DocumentsError(f"{where} must start at 0 and end at the batch's token count {total}, got "
                                 f"{int(cu[0])} .. {int(cu[-1])}")
        if not bool((cu[1:] > cu[:-1]).all()):
            bad = int((cu[1:] <= cu[:-1]).nonzero()[0])
            raise DocumentsError(f"{where} must be strictly increasing; entry {bad + 1} is {int(cu[bad + 1])} "
                                 f"after {int(cu[bad])}")
        row_ends = torch.arange(length, total + 1, length)
        missing = row_ends[~torch.isin(row_ends, cu)]
        if missing.numel():
            raise DocumentsError(f"{where}: a document is longer than the row: it runs over the end of row "
                                 f"{int(missing[0]) // length - 1} (token {int(missing[0])}); split documents at "
                                 f"row ends (every multiple of {length} must be a boundary)")
        return cls(cu, batch, length, device)

    @cached_property
    def lengths(self) -> torch.Tensor:
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]  # (N,)

    @cached_property
    def position_ids(self) -> torch.Tensor:
        """(B, T) position of each token within its document (CPU)."""
        flat = torch.arange(self.batch * self.length) - torch.repeat_interleave(self.cu_seqlens[:-1], self.lengths)
        return flat.view(self.batch, self.length)

    @cached_property
    def max_length(self) -> int:
        return int(self.lengths.max())

    @cached_property
    def device_cu_seqlens(self) -> torch.Tensor:
        """int32 on `device`, as flash-attn's varlen kernel takes it (copied once per forward)."""
        return self.cu_seqlens.to(self.device, torch.int32)

    @cached_property
    def device_positions(self) -> torch.Tensor:
        """(B*T,) position of each token within its document, on `device`."""
        return self.position_ids.flatten().to(self.device)

    def flat(self, t: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (1, B*T, ...): fla's varlen layout, over which cu_seqlens runs."""
        return t.flatten(0, 1)[None]

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """(1, B*T, ...) -> (B, T, ...)."""
        return t[0].unflatten(0, (self.batch, self.length))

    @cached_property
    def seq_idx(self) -> torch.Tensor:
        """(B, T) int32 on `device`: the index of each token's document, as mamba-ssm's and causal-conv1d's
        `seq_idx` take it (a kernel that takes it keeps the documents apart in one call over the rows)."""
        index = torch.repeat_interleave(torch.arange(len(self.lengths), dtype=torch.int32), self.lengths)
        return index.view(self.batch, self.length).to(self.device)

    @cached_property
    def groups(self) -> list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]]:
        """[(index, real)] for every padded length L in 1, 2, 4, ... up to T (a power of two, or T): `index`
        (n, L) is the flat token index of each of its n documents' tokens (padding points at the document's
        first token) and `real` = (where in the flattened (n * L) the real tokens are, their flat token
        index). A length no document pads to gets a placeholder (the batch's first token alone, real None),
        so every rank makes the same number of mixer calls whatever its documents: ZeRO-3 gathers a layer's
        parameters at each call, collectively. Made once per forward on `device` (no host sync in the
        layers) and shared by every layer."""
        padded = torch.clamp(2 ** torch.ceil(torch.log2(self.lengths.double())).long(), max=self.length)
        sizes = sorted({min(2**j, self.length) for j in range(self.length.bit_length() + 1)})
        groups = []
        for L in sizes:
            chosen = (padded == L).nonzero()[:, 0]
            if not chosen.numel():
                groups.append((torch.zeros(1, 1, dtype=torch.long, device=self.device), None))
                continue
            offset = torch.arange(L)
            mask = offset[None, :] < self.lengths[chosen, None]
            index = self.cu_seqlens[chosen, None] + torch.where(mask, offset[None, :], 0)
            real = (mask.flatten().nonzero()[:, 0], index[mask])
            groups.append((index.to(self.device), tuple(t.to(self.device) for t in real)))
        return groups


def per_document(fn, x, docs: Documents) -> torch.Tensor:
    """y[b, t] = fn(document containing (b, t) alone)[its position]. x (B, T, ...) or a tuple of such tensors
    (each cut the same way; fn takes them in order): fn (n, L, ...) -> (n, L, ...), the trailing dims of its
    output free."""
    flats = [t.flatten(0, 1) for t in (x if isinstance(x, tuple | list) else (x,))]  # (B*T, ...) each
    out = None
    for index, real in docs.groups:
        y = fn(*(flat[index] for flat in flats))  # (n, L, ...)
        if out is None:
            out = y.new_zeros(flats[0].shape[0], *y.shape[2:])
        if real is None:  # a placeholder: joins the graph with weight 0, so its backward runs on every rank too
            out = out + 0 * y.sum()
        else:
            where, tokens = real
            # Out of place, so autograd runs through every group.
            out = out.index_copy(0, tokens, y.flatten(0, 1).index_select(0, where))
    return out.view(docs.batch, docs.length, *out.shape[1:])
