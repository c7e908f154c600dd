"""HGRN2 token mixer (Qin et al., 2024, "HGRN2: Gated Linear RNNs with State Expansion").

Per head, the state is expanded by an outer product: with forget gate f_t (per forget dimension),
    S_t = diag(f_t) S_{t-1} + (1 - f_t) i_t^T,    o_t = S_t^T q_t
i.e. gated linear attention with log decay log f_t, key 1 - f_t, value i_t (the input path) and the
query from HGRN's output-gate path, q_t = silu(q_proj(x)). In every HGRN2 layer but the first the forget
gate is bounded below, f = lb + (1 - lb) sigmoid(f_proj(x)), by a learned bound that rises with depth:
    lb = cumsum(softmax(lower_bounds, over layers)) - softmax(...)[0]      (per forget dimension)
so deeper layers remember longer (HGRN's lower bounds). The output is RMS-normalised over d_model,
then projected.

The layout is flash-linear-attention's `HGRN2Attention` + `HGRN2Model.lower_bounds`, so weights map
one to one: q_proj, f_proj, i_proj, g_norm, o_proj here; fla's (n_layers, d_model) `lower_bounds` is the
stack of each layer's `lower_bound` row. The rows live in the layers (each layer owns its parameter)
and `link_layers` (called by CausalLM after building the blocks) lets every HGRN2 layer read all rows
for the softmax over depth. Under ZeRO-3 those peer rows are "external parameters" of each layer
(`deepspeed.zero.register_external_parameter`).

State: the GLA state (B, H, expand_ratio, d_model / H), fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixer_kernels.gla import chunk_gla, gla_step
from mixer_kernels.gla.dispatch import TRITON_CHUNK
from mixer_kernels.gla.reference import zero_state
from models.config import ModelConfig
from models.flops import chunk_width, linear


class HGRN2Mixer(nn.Module):
    kernel_ops = ("gla", "gla_step")

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        hc = cfg.hgrn2
        self.layer_idx = layer_idx
        self.n_heads = cfg.n_heads
        self.forget_dim = cfg.n_heads * hc.expand_ratio  # == d_model (checked by ModelConfig)
        self.head_f_dim, self.head_i_dim = hc.expand_ratio, cfg.d_model // cfg.n_heads
        self.chunk_size = hc.chunk_size
        self.norm_eps = hc.output_norm_eps
        self.q_proj = nn.Linear(cfg.d_model, self.forget_dim, bias=False)
        self.f_proj = nn.Linear(cfg.d_model, self.forget_dim, bias=False)
        self.i_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.g_norm = nn.Module()  # named like fla's so the weight maps by name: g_norm.weight
        self.g_norm.weight = nn.Parameter(torch.ones(cfg.d_model))
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        # This layer's row of fla's `lower_bounds`; zeros = equal softmax shares, the fla init.
        self.lower_bound = nn.Parameter(torch.zeros(self.forget_dim)) if hc.use_lower_bound else None
        self._peers: list[HGRN2Mixer] = [self]

    def init_weights(self) -> None:
        nn.init.ones_(self.g_norm.weight)
        if self.lower_bound is not None:
            nn.init.zeros_(self.lower_bound)

    def link_layers(self, mixers: list[nn.Module]) -> None:
        """Called by CausalLM with every layer's mixer: the HGRN2 ones share the softmax over depth."""
        self._peers = [m for m in mixers if isinstance(m, HGRN2Mixer)]

    def external_parameters(self) -> list[nn.Parameter]:
        """Parameters of other layers this one reads (the peers' lower bounds)."""
        return [m.lower_bound for m in self._peers if m is not self and m.lower_bound is not None]

    def _forget_bound(self) -> torch.Tensor | None:
        """This layer's lower bound on the forget gate (forget_dim,), or None in the first HGRN2 layer."""
        depth = next(i for i, m in enumerate(self._peers) if m is self)
        if self.lower_bound is None or depth == 0:
            return None
        shares = torch.stack([m.lower_bound for m in self._peers]).softmax(0, dtype=torch.float32)
        return shares[1 : depth + 1].sum(0)  # = cumsum(shares)[depth] - shares[0]

    def flops_per_token(self, seq_len: int) -> int:
        d = self.i_proj.in_features
        chunk = chunk_width(self.chunk_size or TRITON_CHUNK, seq_len)
        # Per head: p.v inside the chunk, q S and k^T v (the pairwise q.k with decays is elementwise, uncounted).
        gla = self.n_heads * (2 * chunk * self.head_i_dim + 4 * self.head_f_dim * self.head_i_dim)
        return 2 * linear(d, self.forget_dim) + 2 * linear(d, d) + gla

    def init_state(self, batch_size: int, device=None, dtype=None) -> torch.Tensor:
        return zero_state(batch_size, self.n_heads, self.head_f_dim, self.head_i_dim, device)

    def _qkvg(self, x: torch.Tensor):
        """q, k, g (..., H, expand_ratio) and v (..., H, d_model / H) from x (..., d_model)."""
        q = F.silu(self.q_proj(x))
        g = F.logsigmoid(self.f_proj(x).float())  # log forget gate
        bound = self._forget_bound()
        if bound is not None:  # log(lb + (1 - lb) sigmoid(f)), computed in log space as fla does
            g = torch.logaddexp(bound.log(), torch.log1p(-bound) + g)
        k = 1 - g.exp()
        split = lambda t, d: t.unflatten(-1, (self.n_heads, d))  # noqa: E731
        return (split(q, self.head_f_dim), split(k.to(x.dtype), self.head_f_dim),
                split(self.i_proj(x), self.head_i_dim), split(g, self.head_f_dim))

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        o = o.flatten(-2).float()  # (..., d_model)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.norm_eps) * self.g_norm.weight.float()
        return self.o_proj(o.to(self.o_proj.weight.dtype))

    # Sequence parallelism (train/sequence_parallel.py): the recurrence is independent across heads.
    def sp_head_counts(self) -> dict[str, int]:
        return {"model.n_heads": self.n_heads}

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._qkvg(x)

    def mix(self, q, k, v, g) -> torch.Tensor:
        return chunk_gla(q, k, v, g, chunk_size=self.chunk_size)[0]

    def mix_packed(self, q, k, v, g, docs) -> torch.Tensor:
        """`mix` of packed documents in one call: the GLA kernels take cu_seqlens (mixer_kernels/varlen.py)."""
        o, _ = chunk_gla(*map(docs.flat, (q, k, v, g)), chunk_size=self.chunk_size, cu_seqlens=docs.cu_seqlens)
        return docs.rows(o)

    def forward_packed(self, x: torch.Tensor, docs) -> torch.Tensor:
        return self._out(self.mix_packed(*self._qkvg(x), docs))

    def output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._out(o)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v, g = self._qkvg(x)  # (B, T, H, dk) x3 with g, v (B, T, H, dv)
        o, state = chunk_gla(q, k, v, g, initial_state=state, chunk_size=self.chunk_size)
        return self._out(o), state

    # Context parallelism (train/context_parallel.py): over a piece the state decays by exp(sum of g). The
    # exchange runs on the GLA of the heads `project` gives (all, or a Ulysses rank's share).
    cp_halo_tokens = 0

    def cp_core(self, heads, state: torch.Tensor | None, sp=None, docs=None):
        if docs is not None:  # packed documents, each from a fresh state
            return self.mix_packed(*heads, docs), None
        return chunk_gla(*heads, initial_state=state, chunk_size=self.chunk_size)

    def cp_zeros(self, heads) -> torch.Tensor:
        q, _, v, _ = heads  # (B, T, h, expand_ratio), (B, T, h, d_model / H)
        return zero_state(q.shape[0], q.shape[2], q.shape[3], v.shape[3], q.device)

    def cp_empty(self, heads, tail) -> None:
        return None  # the zero state

    def cp_transition(self, heads, tail, sp=None) -> tuple[torch.Tensor]:
        return (heads[3].sum(1).exp(),)  # (B, h, expand_ratio)

    @staticmethod
    def cp_carry(state: torch.Tensor, own: torch.Tensor, transition) -> torch.Tensor:
        return own + transition[0][..., None] * state

    def step(self, x_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v, g = self._qkvg(x_t)  # (B, H, d)
        o, state = gla_step(q, k, v, g, state)
        return self._out(o), state
