"""Gated DeltaNet token mixer (Yang, Kautz & Hatamizadeh, 2024, "Gated Delta Networks: Improving Mamba2
with Delta Rule").

Per head, a matrix state S (head_dim x value width) decays by a scalar gate and is corrected toward each
new key-value pair (the delta rule):
    S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T,    o_t = S_t^T q_t / sqrt(head_dim)
with q, k, v from projections through short causal convolutions and SiLU, q and k L2-normalised,
beta = sigmoid(b(x)) (2 sigmoid with `allow_neg_eigval`) and g = -exp(A_log) softplus(a(x) + dt_bias). The
output is RMS-normalised per head, gated by silu(g_proj(x)) and projected back. With n_v_heads > n_heads
(fla's GVA) each query/key head serves n_v_heads / n_heads consecutive value heads; decay and beta are per
value head.

The layout is flash-linear-attention's `GatedDeltaNet` layer (q_proj, k_proj, v_proj, a_proj, b_proj,
A_log, dt_bias, q/k/v_conv1d, g_proj, o_norm, o_proj) and so is the initialisation (A uniform in (0, 16),
dt log-uniform in [1e-3, 0.1], convolutions normal like the linears), so weights map one to one
(models/hf/gated_deltanet.py). The recurrence is our gated delta rule (mixer_kernels/delta_rule: the Triton chunk
kernel on the GPU, the PyTorch reference else); the convolutions are mixer_kernels/causal_conv1d.

State: `GDNState`, the (B, n_v_heads, head_dim, value width) fp32 state and each convolution's last inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mixer_kernels.delta_rule import chunk_gated_delta_rule, delta_rule_step
from mixer_kernels.delta_rule.dispatch import TRITON_CHUNK
from models.config import ModelConfig
from models.flops import chunk_width, linear
from models.mixers.mamba import ShortConv, softplus_inverse_dt


@dataclass
class GDNState:
    recurrent: torch.Tensor  # (B, HV, K, V) fp32
    conv: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # q, k, v convolutions' last inputs (B, C, W-1)


def l2_normalize(t: torch.Tensor) -> torch.Tensor:
    """t / sqrt(sum t^2 + 1e-6) over the last dim: fla's l2norm (its eps)."""
    return t * torch.rsqrt(t.float().pow(2).sum(-1, keepdim=True) + 1e-6).to(t.dtype)


class GatedDeltaNetMixer(nn.Module):
    kernel_ops = ("causal_conv1d", "delta_rule", "causal_conv1d_update", "delta_rule_step")

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        gc = cfg.gated_deltanet
        self.layer_idx, self.init_std = layer_idx, cfg.init_std
        self.n_heads = gc.n_heads or cfg.n_heads
        self.n_v_heads = gc.n_v_heads or self.n_heads
        self.head_k_dim, self.head_v_dim = gc.head_dim, int(gc.head_dim * gc.expand_v)
        self.key_dim, self.value_dim = self.n_heads * self.head_k_dim, self.n_v_heads * self.head_v_dim
        self.chunk_size, self.conv_size, self.norm_eps = gc.chunk_size, gc.conv_size, cfg.norm_eps
        self.use_output_gate, self.allow_neg_eigval = gc.use_output_gate, gc.allow_neg_eigval

        d = cfg.d_model
        self.q_proj = nn.Linear(d, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d, self.key_dim, bias=False)
        self.v_proj = nn.Linear(d, self.value_dim, bias=False)
        self.a_proj = nn.Linear(d, self.n_v_heads, bias=False)  # decay gate input
        self.b_proj = nn.Linear(d, self.n_v_heads, bias=False)  # write strength input
        self.A_log = nn.Parameter(torch.zeros(self.n_v_heads))
        self.dt_bias = nn.Parameter(torch.zeros(self.n_v_heads))
        self.q_conv1d = ShortConv(self.key_dim, gc.conv_size, bias=False)
        self.k_conv1d = ShortConv(self.key_dim, gc.conv_size, bias=False)
        self.v_conv1d = ShortConv(self.value_dim, gc.conv_size, bias=False)
        if self.use_output_gate:
            self.g_proj = nn.Linear(d, self.value_dim, bias=False)
        self.o_norm = nn.Module()  # named like fla's so the weight maps by name: o_norm.weight
        self.o_norm.weight = nn.Parameter(torch.ones(self.head_v_dim))
        self.o_proj = nn.Linear(self.value_dim, d, bias=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """fla's GatedDeltaNet init: A uniform in (0, 16), dt log-uniform in [1e-3, 0.1] (inverse softplus),
        the convolutions normal with the linears' std."""
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0, 16).log())
        self.dt_bias.copy_(softplus_inverse_dt(self.n_v_heads, 1e-3, 0.1, 1e-4, self.dt_bias.device))
        for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d):
            nn.init.normal_(conv.weight, std=self.init_std)
        nn.init.ones_(self.o_norm.weight)

    def flops_per_token(self, seq_len: int) -> float:
        d, hk, hv = self.q_proj.in_features, self.head_k_dim, self.head_v_dim
        chunk = chunk_width(self.chunk_size or TRITON_CHUNK, seq_len)
        projections = 2 * linear(d, self.key_dim) + linear(d, self.value_dim) + 2 * linear(d, self.n_v_heads)
        conv = 2 * (2 * self.key_dim + self.value_dim) * self.conv_size
        # WY form per value head: k k^T, T k, T v, q k^T; w S, q S, p v_new, k^T v_new (as MoM's memories).
        recurrence = self.n_v_heads * (6 * chunk * hk + 4 * chunk * hv + 6 * hk * hv)
        output = (linear(d, self.value_dim) if self.use_output_gate else 0) + linear(self.value_dim, d)
        return projections + conv + recurrence + output

    def init_state(self, batch_size: int, device=None, dtype=None) -> GDNState:
        recurrent = torch.zeros(batch_size, self.n_v_heads, self.head_k_dim, self.head_v_dim, device=device)
        convs = tuple(c.init_state(batch_size, device, dtype) for c in (self.q_conv1d, self.k_conv1d, self.v_conv1d))
        return GDNState(recurrent, convs)

    # ------------------------------------------------------------------------------------------------
    # The three parts of a layer: token-local projections, per-head mixing, token-local output
    # ------------------------------------------------------------------------------------------------

    def _project(self, x: torch.Tensor):
        """x (..., d) -> q, k (..., H, K), v (..., HV, V) before their convolutions, a and b (..., HV)."""
        split = lambda t, d: t.unflatten(-1, (-1, d))  # noqa: E731
        return (split(self.q_proj(x), self.head_k_dim), split(self.k_proj(x), self.head_k_dim),
                split(self.v_proj(x), self.head_v_dim), self.a_proj(x), self.b_proj(x))

    def _gates(self, a: torch.Tensor, b: torch.Tensor, v_heads: slice):
        """Log decay g and write strength beta (fp32) of the value heads `v_heads`."""
        g = -self.A_log[v_heads].float().exp() * F.softplus(a.float() + self.dt_bias[v_heads].float())
        beta = b.float().sigmoid()
        return g, 2 * beta if self.allow_neg_eigval else beta

    def _per_value_head(self, q: torch.Tensor, k: torch.Tensor):
        """GVA: each query/key head serves n_v_heads / n_heads consecutive value heads (fla's i_h // (HV / H))."""
        groups = self.n_v_heads // self.n_heads
        if groups == 1:
            return q, k
        return q.repeat_interleave(groups, dim=-2), k.repeat_interleave(groups, dim=-2)

    def _mix(self, q, k, v, a, b, heads: slice, v_heads: slice, state: GDNState | None, docs=None):
        """Whole sequences of the heads `heads` (and their value heads `v_heads`): convolutions, gates and
        the gated delta rule. q, k (B, T, h, K), v (B, T, hv, V), a, b (B, T, hv) -> o (B, T, hv, V), state.
        `docs`: packed documents, kept apart in one call (the convolutions take seq_idx, the delta rule
        cu_seqlens); then no state is returned."""
        convs = (None, None, None) if state is None else state.conv
        rows_k = slice(heads.start * self.head_k_dim, heads.stop * self.head_k_dim)
        rows_v = slice(v_heads.start * self.head_v_dim, v_heads.stop * self.head_v_dim)
        seq_idx = None if docs is None else docs.seq_idx
        outs = [conv(t.flatten(-2), s, rows, seq_idx) for conv, t, s, rows in
                zip((self.q_conv1d, self.k_conv1d, self.v_conv1d), (q, k, v), convs, (rows_k, rows_k, rows_v))]
        (q, cq), (k, ck), (v, cv) = outs
        q, k = (l2_normalize(t.unflatten(-1, (-1, self.head_k_dim))) for t in (q, k))
        q, k = self._per_value_head(q, k)
        g, beta = self._gates(a, b, v_heads)
        v = v.unflatten(-1, (-1, self.head_v_dim))
        if docs is not None:
            o, _ = chunk_gated_delta_rule(*map(docs.flat, (q, k, v, g, beta)), chunk_size=self.chunk_size,
                                          cu_seqlens=docs.cu_seqlens)
            return docs.rows(o), None
        o, recurrent = chunk_gated_delta_rule(
            q, k, v, g, beta, initial_state=None if state is None else state.recurrent, chunk_size=self.chunk_size,
        )
        return o, GDNState(recurrent, (cq, ck, cv))

    def _out(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-head RMSNorm, gate silu(g_proj(x)), o_proj (fla's FusedRMSNormGated). o (..., HV, V)."""
        o32 = o.float()
        o32 = o32 * torch.rsqrt(o32.pow(2).mean(-1, keepdim=True) + self.norm_eps) * self.o_norm.weight.float()
        if self.use_output_gate:
            o32 = o32 * F.silu(self.g_proj(x).float()).unflatten(-1, (-1, self.head_v_dim))
        return self.o_proj(o32.flatten(-2).to(x.dtype))

    def forward(self, x: torch.Tensor, state: GDNState | None = None) -> tuple[torch.Tensor, GDNState]:
        o, state = self._mix(*self._project(x), slice(0, self.n_heads), slice(0, self.n_v_heads), state)
        return self._out(o, x), state

    def forward_packed(self, x: torch.Tensor, docs) -> torch.Tensor:
        """Packed documents (models/documents.py) in one call: x (B, T, d) -> y (B, T, d)."""
        o, _ = self._mix(*self._project(x), slice(0, self.n_heads), slice(0, self.n_v_heads), None, docs)
        return self._out(o, x)

    def step(self, x_t: torch.Tensor, state: GDNState) -> tuple[torch.Tensor, GDNState]:
        """x_t (B, d) -> y_t (B, d), the state after this token."""
        q, k, v, a, b = self._project(x_t)
        (q, cq), (k, ck), (v, cv) = (conv.step(t.flatten(-2), s) for conv, t, s in
                                     zip((self.q_conv1d, self.k_conv1d, self.v_conv1d), (q, k, v), state.conv))
        q, k = self._per_value_head(*(l2_normalize(t.unflatten(-1, (-1, self.head_k_dim))) for t in (q, k)))
        g, beta = self._gates(a, b, slice(0, self.n_v_heads))
        o, recurrent = delta_rule_step(q, k, v.unflatten(-1, (-1, self.head_v_dim)), g, beta, state.recurrent)
        return self._out(o, x_t), GDNState(recurrent, (cq, ck, cv))

    # Context parallelism (train/context_parallel.py). The exchange runs on the heads `project` gives (all, or
    # a Ulysses rank's share: `sp`). Over a piece the state maps as S -> P S + (own writes), P the product of
    # exp(g_t) (I - beta_t k_t k_t^T): a (K, K) matrix per value head, read off the kernel itself by running the
    # piece with zero values from the identity state. The convolutions start from the previous piece's last
    # conv_size - 1 inputs (`tail`: those of the projections).
    @property
    def cp_halo_tokens(self) -> int:
        return self.conv_size - 1

    def project(self, x: torch.Tensor):
        return self._project(x)

    def output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._out(o, x)

    def _heads(self, sp) -> tuple[slice, slice]:
        if sp is None:
            return slice(0, self.n_heads), slice(0, self.n_v_heads)
        return sp.local(self.n_heads), sp.local(self.n_v_heads)

    def cp_core(self, heads, state: GDNState | None, sp=None, docs=None):
        return self._mix(*heads, *self._heads(sp), state, docs)

    def cp_zeros(self, heads, tail=None) -> GDNState:
        q, _, v, _, _ = heads  # (B, T, h, K), (B, T, hv, V)
        recurrent = torch.zeros(q.shape[0], v.shape[2], self.head_k_dim, self.head_v_dim, device=q.device)
        w = self.conv_size - 1
        convs = tuple(torch.zeros(q.shape[0], t.shape[2] * t.shape[3], w, device=q.device, dtype=t.dtype)
                      for t in heads[:3]) if tail is None else tuple(t.flatten(-2).transpose(1, 2) for t in tail[:3])
        return GDNState(recurrent, convs)

    def cp_empty(self, heads, tail) -> GDNState:
        return self.cp_zeros(heads, tail)

    def cp_transition(self, heads, tail, sp=None) -> tuple[torch.Tensor]:
        (h, hv), conv_states = self._heads(sp), self.cp_zeros(heads, tail).conv
        q, k, _, a, b = heads
        rows = slice(h.start * self.head_k_dim, h.stop * self.head_k_dim)
        q, k = (conv(t.flatten(-2), s, rows)[0] for conv, t, s in zip((self.q_conv1d, self.k_conv1d), (q, k), conv_states))
        q, k = self._per_value_head(*(l2_normalize(t.unflatten(-1, (-1, self.head_k_dim))) for t in (q, k)))
        g, beta = self._gates(a, b, hv)
        eye = torch.eye(self.head_k_dim, device=q.device).expand(q.shape[0], q.shape[2], -1, -1).contiguous()
        # S_T = P S_0 + (writes): with v = 0 the writes vanish, so S_0 = I gives S_T = P.
        _, p = chunk_gated_delta_rule(q, k, torch.zeros_like(k), g, beta, initial_state=eye, chunk_size=self.chunk_size)
        return (p,)  # (B, hv, K, K)

    @staticmethod
    def cp_carry(state: GDNState, own: GDNState, transition) -> GDNState:
        return GDNState(own.recurrent + transition[0] @ state.recurrent, own.conv)

    # Sequence parallelism (train/sequence_parallel.py): convolutions, gates and the recurrence are per head, so
    # one all-to-all of the projections gives each rank whole sequences of its heads (its query/key heads and
    # the value heads they serve), and one brings the outputs back to the local tokens.
    def sp_head_counts(self) -> dict[str, int]:
        return {"gated_deltanet.n_heads (else model.n_heads)": self.n_heads,
                "gated_deltanet.n_v_heads": self.n_v_heads}

    def sp_forward(self, x: torch.Tensor, sp, docs=None) -> torch.Tensor:
        """This rank's tokens x (B, T/sp, d) -> y (B, T/sp, d); `docs`: packed documents over the whole rows."""
        heads = [sp.seq_to_heads(t) for t in self._project(x)]
        o, _ = self._mix(*heads, sp.local(self.n_heads), sp.local(self.n_v_heads), None, docs)
        return self._out(sp.heads_to_seq(o), x)
