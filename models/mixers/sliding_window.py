"""Sliding-window attention (letter `W`): Llama attention whose queries read only the last `window` positions.

A mixer of its own rather than an option on `attention`, so a pattern can mix full and windowed layers
(`pattern: "WWWA"`) and SCOUT can use it as its local mixer. Projections, RoPE and the sequence-parallel
split (`project` / `mix` / `output`) are the attention mixer's; only the mask and the decoding state
differ: the KV cache keeps the last window - 1 tokens, so decoding memory is bounded.
"""

from dataclasses import dataclass

import torch

from mixer_kernels.attention import attention
from models.config import ModelConfig
from models.mixers.attention import AttentionMixer


@dataclass
class WindowCache:
    k: torch.Tensor  # (B, H_kv, <= window - 1, head_dim), rotated at their absolute positions
    v: torch.Tensor  # (B, H_kv, <= window - 1, head_dim)
    seen: int  # tokens consumed so far: the RoPE position of the next token


class SlidingWindowMixer(AttentionMixer):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.window = cfg.sliding_window.window

    def flops_per_token(self, seq_len: int) -> int:
        return self.projection_flops() + self.attention_flops(min(self.window, seq_len))

    def init_state(self, batch_size: int, device=None, dtype=None) -> WindowCache:
        empty = torch.zeros(batch_size, self.n_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return WindowCache(empty, empty.clone(), 0)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int) -> torch.Tensor:
        """q (B, H, T, hd), k and v (B, H_kv, offset + T, hd) -> (B, T, H, hd)."""
        return attention(q, k, v, offset, window=self.window).transpose(1, 2)

    def forward(self, x: torch.Tensor, state: WindowCache | None = None) -> tuple[torch.Tensor, WindowCache]:
        q, k, v = (t.transpose(1, 2) for t in self.project(x))  # (B, h, T, hd)
        seen = 0 if state is None else state.seen
        q, k = self._rope(q, k, seen)
        if state is not None:
            k = torch.cat([state.k.to(k.dtype), k], dim=2)
            v = torch.cat([state.v.to(v.dtype), v], dim=2)
        y = self._attend(q, k, v, k.shape[2] - q.shape[2])
        keep = max(k.shape[2] - (self.window - 1), 0)  # older keys fall out of every later window
        return self.output(y, x), WindowCache(k[:, :, keep:], v[:, :, keep:], seen + x.shape[1])

    def step(self, x_t: torch.Tensor, state: WindowCache) -> tuple[torch.Tensor, WindowCache]:
        y, state = self.forward(x_t[:, None], state)
        return y[:, 0], state
