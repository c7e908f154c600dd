"""Llama-style causal self-attention: RoPE, grouped-query heads, and a KV cache as the decoding state."""

from dataclasses import dataclass

import torch
from torch import nn

from mixer_kernels.attention import causal_attention, packed_attention
from models.config import ModelConfig
from models.flops import linear


@dataclass
class KVCache:
    k: torch.Tensor  # (B, H_kv, T_seen, head_dim)
    v: torch.Tensor  # (B, H_kv, T_seen, head_dim)

    @property
    def length(self) -> int:
        return self.k.shape[-2]


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, head_dim) for the rotate-half convention (Llama / Hugging Face)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class AttentionMixer(nn.Module):
    kernel_ops = ("attention",)  # the mixer_kernels/ ops this mixer calls (train/kernel_report.py)
    window: int | None = None  # keys a query reads; sliding-window attention sets it

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.attention.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.head_dim
        self.rope_theta = cfg.attention.rope_theta
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)

    def init_state(self, batch_size: int, device=None, dtype=None) -> KVCache:
        empty = torch.zeros(batch_size, self.n_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return KVCache(empty, empty.clone())

    def sp_head_counts(self) -> dict[str, int]:
        return {"model.n_heads": self.n_heads, "attention.n_kv_heads": self.n_kv_heads}

    def projection_flops(self) -> int:
        d, q_dim, kv_dim = self.q_proj.in_features, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return linear(d, q_dim) + 2 * linear(d, kv_dim) + linear(q_dim, d)

    def attention_flops(self, keys: int) -> int:
        """q.k and p.v of one query against `keys` keys, every head (models/flops.py)."""
        return 4 * keys * self.n_heads * self.head_dim

    def flops_per_token(self, seq_len: int) -> int:
        return self.projection_flops() + self.attention_flops(seq_len)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (B, T, D) -> q (B, T, H, hd), k and v (B, T, H_kv, hd)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim)
        k = self.k_proj(x).view(b, t, -1, self.head_dim)
        v = self.v_proj(x).view(b, t, -1, self.head_dim)
        return q, k, v

    def _rope(self, q: torch.Tensor, k: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k (B, h, T, hd) rotated for absolute positions offset .. offset + T - 1."""
        t = q.shape[2]
        cos, sin = rope_cos_sin(torch.arange(offset, offset + t, device=q.device), self.head_dim, self.rope_theta)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int) -> torch.Tensor:
        """q (B, H, T, hd), k and v (B, H_kv, T_seen, hd) -> (B, T, H, hd)."""
        repeat = q.shape[1] // k.shape[1]
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        return causal_attention(q, k, v, q_offset=offset).transpose(1, 2)

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Whole sequences of some heads: (B, T, h, hd) each -> (B, T, h, hd)."""
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, h, T, hd)
        q, k = self._rope(q, k, 0)
        return self._attend(q, k, v, 0)

    def output(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(y.flatten(2))

    def sp_forward(self, x: torch.Tensor, sp, docs=None) -> torch.Tensor:
        """Sequence parallelism (train/sequence_parallel.py): DeepSpeed's DistributedAttention runs `mix` (or,
        on packed documents over the whole rows, `mix_packed`) between its all-to-alls. This rank's tokens
        x (B, T/sp, D) -> (B, T/sp, D)."""
        local = self.mix if docs is None else lambda q, k, v: self.mix_packed(q, k, v, docs)
        return self.output(sp.attention(local, *self.project(x)), x)

    def cp_mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp, docs=None) -> torch.Tensor:
        """Context parallelism (train/context_parallel.py): `mix` of this rank's piece, (B, T/cp, h, hd) each ->
        (B, T/cp, h, hd). Keys and values of every piece are all-gathered, and queries read them at their
        absolute positions (causal mask across pieces). A window no longer than a piece needs only the previous
        piece's last window - 1 keys and values (a halo): only those are gathered. `docs`: packed documents
        over the whole rows (each query reads its own document's keys, RoPE from the document's start)."""
        if docs is not None:
            return self._cp_mix_packed(q, k, v, cp, docs)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, h, T/cp, hd)
        t = q.shape[2]
        offset = cp.offset(t)
        q, k = self._rope(q, k, offset)
        if self.window is not None and self.window - 1 <= t:
            k, v = (cp.with_previous(z, self.window - 1, dim=2) for z in (k, v))
            return self._attend(q, k, v, k.shape[2] - t)
        start = 0 if self.window is None else max(0, offset - self.window + 1)
        k, v = (cp.all_gather(z, dim=2)[:, :, start:offset + t] for z in (k, v))
        return self._attend(q, k, v, offset - start)

    def _cp_mix_packed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp, docs) -> torch.Tensor:
        # Varlen attention whose documents have more keys than queries: a piece's queries are the last
        # positions of their documents' keys so far (flash-attn aligns its causal mask that way).
        b, t = q.shape[:2]
        end = cp.offset(t) + t
        if self.window is not None and self.window - 1 <= t:
            k, v = (cp.with_previous(z, self.window - 1, dim=1) for z in (k, v))
        else:
            k, v = (cp.all_gather(z, dim=1)[:, :end] for z in (k, v))
        keys, q_pos, k_pos, cu_q, max_q, cu_k, max_k = cp.pieces(docs, 0).attention(end - k.shape[1])
        q = q.flatten(0, 1)  # (B*T/cp, h, hd)
        k, v = (z.flatten(0, 1).index_select(0, keys) for z in (k, v))
        cos, sin = rope_cos_sin(q_pos, self.head_dim, self.rope_theta)
        q = apply_rope(q, cos[:, None], sin[:, None])
        cos, sin = rope_cos_sin(k_pos, self.head_dim, self.rope_theta)
        k = apply_rope(k, cos[:, None], sin[:, None])
        y = packed_attention(q, k, v, cu_q, max_q, self.window, cu_k, max_k)
        return y.unflatten(0, (b, t))

    def forward(self, x: torch.Tensor, state: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        q, k, v = (t.transpose(1, 2) for t in self.project(x))  # (B, h, T, hd)
        offset = 0 if state is None else state.length
        q, k = self._rope(q, k, offset)
        if state is not None:
            k = torch.cat([state.k.to(k.dtype), k], dim=2)
            v = torch.cat([state.v.to(v.dtype), v], dim=2)
        return self.output(self._attend(q, k, v, offset), x), KVCache(k, v)

    def forward_packed(self, x: torch.Tensor, docs) -> torch.Tensor:
        """Packed documents (models/documents.py): x (B, T, D) -> (B, T, D), each document attending to itself
        only, its RoPE positions starting at 0 (flash-attn's varlen kernel on CUDA)."""
        return self.output(self.mix_packed(*self.project(x), docs), x)

    def mix_packed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs) -> torch.Tensor:
        """Whole rows of some heads, (B, T, h, hd) each -> (B, T, h, hd): RoPE from each document's start and
        varlen attention over cu_seqlens."""
        b, t = q.shape[:2]
        q, k, v = (z.flatten(0, 1) for z in (q, k, v))  # (B*T, h, hd)
        cos, sin = rope_cos_sin(docs.device_positions, self.head_dim, self.rope_theta)
        q, k = apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos[:, None], sin[:, None])
        y = packed_attention(q, k, v, docs.device_cu_seqlens, docs.max_length, self.window)  # (B*T, h, hd)
        return y.unflatten(0, (b, t))

    def step(self, x_t: torch.Tensor, state: KVCache) -> tuple[torch.Tensor, KVCache]:
        y, state = self.forward(x_t[:, None], state)
        return y[:, 0], state
