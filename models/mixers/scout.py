"""The SCOUT mixer `scout` (letter `S`; Jafari et al., 2025, "SCOUT: Toward Sub-Quadratic Attention via
Segment Compression for Optimized Utility in Transformers").

Formulation implemented (per layer, on the normed input x of the block):

1. Local mixing. u = local(x), the local mixer chosen by `scout.local_mixer` (Mamba-2, Mamba or
   sliding-window attention; each reads its own config section, e.g. `model.mamba2`). u_t depends on
   tokens <= t only, and summarises the prefix (a recurrent mixer) or the last window (SWA).
2. Checkpoints. The sequence is cut into segments of S tokens; segment j's compressed checkpoint token
   is the local mixer's output at its last position, (j + 1) * S - 1, the point where the mixer has read
   the whole segment. Its key and value are that token's own key and value (one projection for all).
3. Checkpoint attention. With h = RMSNorm(u), token t attends, in one softmax, to itself and to the
   checkpoints of the segments before its own (j < t // S, i.e. checkpoint positions < t): RoPE'd
   queries and keys from the attention mixer's projections. Attention cost and memory grow as
   T * (T / S + 1), not T^2 (mixer_kernels/attention `checkpoint_attention`). Its local context reaches it
   through u only. Causality is exact: a checkpoint is visible only after its segment has ended.
4. Output: u + o_proj(attention); the block adds the residual and its FFN around it.

Decoding state: the local mixer's state, the keys/values of the checkpoints so far (growing as T / S by
design), and the position (which fixes where the current segment ends).
"""

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mixer_kernels.attention import checkpoint_attention
from models.config import ModelConfig
from models.documents import per_document
from models.mixers.attention import AttentionMixer, KVCache
from models.norms import RMSNorm


@dataclass
class SCOUTState:
    local: Any  # the local mixer's own state
    checkpoints: KVCache  # (B, H_kv, completed segments, hd): each segment's checkpoint key and value
    seen: int  # tokens consumed so far: RoPE position of the next token


class SCOUTMixer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        from models.registry import build_mixer  # the one mixer factory (the registry imports this module)

        self.segment = cfg.scout.segment_size
        self.local = build_mixer(cfg.scout.local_mixer, cfg, layer_idx)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = AttentionMixer(cfg, layer_idx)  # projections and RoPE of the checkpoint attention

    @property
    def kernel_ops(self) -> tuple[str, ...]:
        return (*self.local.kernel_ops, "checkpoint_attention")

    def flops_per_token(self, seq_len: int) -> float:
        """The local mixer, then attention to the T / S checkpoints (its own key is an elementwise product)."""
        return (self.local.flops_per_token(seq_len) + self.attn.projection_flops()
                + self.attn.attention_flops(seq_len // self.segment))

    def init_weights(self) -> None:
        if hasattr(self.local, "init_weights"):
            self.local.init_weights()

    def init_state(self, batch_size: int, device=None, dtype=None) -> SCOUTState:
        empty = torch.zeros(batch_size, self.attn.n_kv_heads, 0, self.attn.head_dim, device=device, dtype=dtype)
        return SCOUTState(self.local.init_state(batch_size, device, dtype), KVCache(empty, empty.clone()), 0)

    def forward(self, x: torch.Tensor, state: SCOUTState | None = None) -> tuple[torch.Tensor, SCOUTState]:
        """x (B, T, D) -> y (B, T, D), state after the last token."""
        if state is not None:  # continuing a prefill: token by token (prefill from scratch is parallel)
            ys = []
            for t in range(x.shape[1]):
                y_t, state = self.step(x[:, t], state)
                ys.append(y_t)
            return torch.stack(ys, dim=1), state
        u, local_state = self.local(x)  # (B, T, D)
        h = self.norm(u)
        y, checkpoints = self._attend_checkpoints(*self.attn.project(h))
        return u + self.attn.output(y, h), SCOUTState(local_state, checkpoints, x.shape[1])

    def _attend_checkpoints(self, q, k, v) -> tuple[torch.Tensor, KVCache]:
        """q (B, T, h, hd), k and v (B, T, h_kv, hd) of whole sequences -> y (B, T, h, hd), the checkpoints."""
        t, s = q.shape[1], self.segment
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, h, T, hd)
        q, k = self.attn._rope(q, k, 0)
        ck, cv = k[:, :, s - 1::s], v[:, :, s - 1::s]  # (B, h_kv, T // S, hd): completed segments only
        n_visible = torch.arange(t, device=q.device) // s  # token t reads segments 0 .. t // S - 1
        return checkpoint_attention(q, k, v, ck, cv, n_visible).transpose(1, 2), KVCache(ck, cv)

    # Sequence parallelism (train/sequence_parallel.py): two splits in a row. The local mixer runs its own
    # (heads or channels); the checkpoint attention is independent across heads, so it is a plain Ulysses
    # split around it, on the normed local output.
    def sp_head_counts(self) -> dict[str, int]:
        return {**self.local.sp_head_counts(), **self.attn.sp_head_counts()}

    def sp_forward(self, x: torch.Tensor, sp, docs=None) -> torch.Tensor:
        """This rank's tokens x (B, T/sp, D) -> y (B, T/sp, D); `docs`: packed documents over the whole rows."""
        u = sp.run(self.local, x, docs)
        h = self.norm(u)
        whole = [sp.seq_to_heads(z) for z in self.attn.project(h)]
        attend = lambda q, k, v: self._attend_checkpoints(q, k, v)[0]  # noqa: E731
        y = attend(*whole) if docs is None else per_document(attend, whole, docs)
        return u + self.attn.output(sp.heads_to_seq(y), h)

    # Context parallelism (train/context_parallel.py, mode 'composite'): the local mixer runs its own exchange
    # (state passing, or a sliding window's halo), and the checkpoint attention needs from the earlier pieces
    # only their checkpoints: each rank all-gathers its piece's checkpoint keys and values, T / S per layer.
    def cp_parts(self) -> list[nn.Module]:
        return [self.local]

    def cp_forward(self, x: torch.Tensor, cp) -> torch.Tensor:
        """This rank's piece x (B, T/cp, D) -> y (B, T/cp, D). Packed documents run gathered: their checkpoints
        sit at each document's own segment ends, which this exchange does not follow yet."""
        u = cp.run(self.local, x)
        h = self.norm(u)
        q, k, v = (z.transpose(1, 2) for z in self.attn.project(h))  # (B, h, T/cp, hd)
        t, s = q.shape[2], self.segment
        offset = cp.offset(t)
        q, k = self.attn._rope(q, k, offset)
        # Piece r holds the checkpoints at absolute positions j * S - 1 in [r t, (r + 1) t): the same number on
        # every rank when S divides t, else one fewer on some, so each sends ceil(t / S) slots, padded.
        slots = -(-t // s)
        counts = [len(range((s - 1 - r * t) % s, t, s)) for r in range(cp.size)]  # checkpoints of each piece
        first = (s - 1 - offset) % s  # this piece's first checkpoint
        ck, cv = (torch.cat([z[:, :, first::s], z.new_zeros(*z.shape[:2], slots - counts[cp.rank], z.shape[3])],
                            dim=2) for z in (k, v))
        keep = torch.cat([torch.arange(n) + r * slots for r, n in enumerate(counts)])[:(offset + t) // s]
        keep = keep.to(q.device)  # those before this piece's end
        gathered = [cp.all_gather(z, dim=2) for z in (ck, cv)]
        ck, cv = (z.index_select(2, keep) for z in gathered)
        n_visible = (offset + torch.arange(t, device=q.device)) // s  # a token reads the segments before its own
        y = checkpoint_attention(q, k, v, ck, cv, n_visible).transpose(1, 2)
        return cp.tie(u + self.attn.output(y, h), *gathered)

    def step(self, x_t: torch.Tensor, state: SCOUTState) -> tuple[torch.Tensor, SCOUTState]:
        """x_t (B, D) -> y_t (B, D), state after this token."""
        u, local_state = self.local.step(x_t, state.local)  # (B, D)
        h = self.norm(u)[:, None]  # (B, 1, D)
        q, k, v = (z.transpose(1, 2) for z in self.attn.project(h))  # (B, h, 1, hd)
        q, k = self.attn._rope(q, k, state.seen)
        ck, cv = state.checkpoints.k, state.checkpoints.v
        n_visible = torch.full((1,), ck.shape[2], device=x_t.device)
        y = checkpoint_attention(q, k, v, ck, cv, n_visible).transpose(1, 2)  # (B, 1, H, hd)
        if (state.seen + 1) % self.segment == 0:  # this token ends its segment: it becomes a checkpoint
            ck, cv = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
        return u + self.attn.output(y, h)[:, 0], SCOUTState(local_state, KVCache(ck, cv), state.seen + 1)
