"""Mixture-of-Memories token mixer (Du et al., 2025, "MoM: Linear Sequence Modeling with Mixture-of-Memories").

A router scores each token against `num_memories` memories and writes it to its top_k (weights
renormalised over the chosen ones). The tokens routed to a memory form that memory's own subsequence:
its short convolutions and its recurrence run over those tokens only, in time order, so a memory's state
never sees a token routed elsewhere. Each memory has its own k, v, beta and decay projections; q, the
convolution weights, the decay parameters (A_log, dt_bias) and the output path are shared. A token's
output is the routing-weighted sum of its memories' outputs, plus (with `shared_memory`) the output of a
memory every token goes through; then a per-head RMSNorm gated by silu(g_proj(x)) and o_proj.

Memory recurrence (`mom.backend`): the gated delta rule (MoM's and fla's default; q and k L2-normalised,
decay g = -exp(A_log) softplus(a(x) + dt_bias), beta = sigmoid(b(x))) or GLA with a per-key decay
logsigmoid(gk(x)) / 16 (GLA's normaliser).

The layout follows flash-linear-attention's `MomAttention` (q_proj, gate, k_proj / v_proj / b_proj /
a_proj lists, shared_k / shared_v / shared_b / shared_a, A_log, dt_bias, q/k/v_conv1d, g_proj, o_norm,
o_proj) so weights map one to one. fla runs its convolutions over memory boundaries in training mode
(no cu_seqlens there); we always keep memories separate, which is fla's eval-mode behaviour.

Load balancing: the Switch-Transformer loss of this layer's router (fla's `load_balancing_loss_func`
on one layer), times `aux_loss_coef / number of MoM layers`, is left in `self.aux_loss` after each
forward; CausalLM adds the sum over layers to the loss and reports it as `LMOutput.aux_loss`.

Capacity (`capacity_factor`, off by default as in fla): a memory takes at most
ceil(factor * top_k * max_seq_len / num_memories) tokens of a sequence, first come first served; the
counts travel in the state, so decoding drops exactly the tokens the full forward drops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mixer_kernels.delta_rule import chunk_gated_delta_rule, delta_rule_step
from mixer_kernels.delta_rule.dispatch import TRITON_CHUNK as DELTA_RULE_CHUNK
from mixer_kernels.gla import chunk_gla, gla_step
from mixer_kernels.gla.dispatch import TRITON_CHUNK as GLA_CHUNK
from models.config import ModelConfig
from models.documents import per_document
from models.flops import chunk_width, linear
from models.mixers.mamba import softplus_inverse_dt


@dataclass
class MoMState:
    memories: torch.Tensor  # (B, M, H, dk, dv) fp32
    conv: torch.Tensor  # (B, M, C, W-1): each memory's last W-1 pre-convolution q|k|v inputs
    counts: torch.Tensor  # (B, M) tokens each memory has taken so far (for the capacity limit)
    shared: torch.Tensor | None  # (B, H, dk, dv) fp32, or None without a shared memory
    shared_conv: torch.Tensor | None  # (B, C, W-1)


def load_balancing_loss(router_logits: torch.Tensor, top_k: int, total=lambda t: t) -> torch.Tensor:
    """Switch-Transformer loss of one layer: router_logits (N, M) -> num_memories * sum_e f_e P_e, with
    f the fraction of routing slots that chose e (per top-k rank) and P the mean router probability.
    `total`: a sum over more tokens than these (context parallelism's pieces: an all-reduce)."""
    probs = router_logits.float().softmax(-1)
    chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, probs.shape[-1]).float()  # (N, k, M)
    n = total(torch.tensor(float(probs.shape[0]), device=probs.device))
    return (total(chosen.sum(0)) / n * (total(probs.sum(0)) / n)[None]).sum() * probs.shape[-1]


class MoMMixer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        mc = cfg.mom
        self.layer_idx = layer_idx
        self.n_heads, self.head_k_dim = cfg.n_heads, mc.head_dim
        self.head_v_dim = int(mc.head_dim * mc.expand_v)
        self.key_dim, self.value_dim = self.n_heads * self.head_k_dim, self.n_heads * self.head_v_dim
        self.num_memories, self.top_k = mc.num_memories, mc.top_k
        self.backend, self.chunk_size, self.conv_size = mc.backend, mc.chunk_size, mc.conv_size
        self.norm_eps = cfg.norm_eps
        self.use_output_gate = mc.use_output_gate
        self.capacity = (None if mc.capacity_factor is None else
                         math.ceil(mc.capacity_factor * mc.top_k * cfg.max_seq_len / mc.num_memories))
        self.aux_loss_scale = mc.aux_loss_coef / cfg.layer_mixers().count("mom")
        self.aux_loss: torch.Tensor | None = None

        d, m = cfg.d_model, mc.num_memories
        gate_dim = self.n_heads if self.backend == "gated_delta_rule" else self.key_dim  # scalar / per-key decay
        self.q_proj = nn.Linear(d, self.key_dim, bias=False)
        self.gate = nn.Linear(d, m, bias=False)  # the router
        self.k_proj = nn.ModuleList(nn.Linear(d, self.key_dim, bias=False) for _ in range(m))
        self.v_proj = nn.ModuleList(nn.Linear(d, self.value_dim, bias=False) for _ in range(m))
        self.a_proj = nn.ModuleList(nn.Linear(d, gate_dim, bias=False) for _ in range(m))
        if self.backend == "gated_delta_rule":
            self.b_proj = nn.ModuleList(nn.Linear(d, self.n_heads, bias=False) for _ in range(m))
        self.shared_memory = mc.shared_memory
        if self.shared_memory:
            self.shared_k = nn.Linear(d, self.key_dim, bias=False)
            self.shared_v = nn.Linear(d, self.value_dim, bias=False)
            self.shared_a = nn.Linear(d, gate_dim, bias=False)
            if self.backend == "gated_delta_rule":
                self.shared_b = nn.Linear(d, self.n_heads, bias=False)
        if self.backend == "gated_delta_rule":
            self.A_log = nn.Parameter(torch.zeros(self.n_heads))
            self.dt_bias = nn.Parameter(torch.zeros(self.n_heads))
        conv = lambda dim: nn.Conv1d(dim, dim, mc.conv_size, groups=dim, bias=False)  # noqa: E731
        self.q_conv1d, self.k_conv1d, self.v_conv1d = conv(self.key_dim), conv(self.key_dim), conv(self.value_dim)
        if self.use_output_gate:
            self.g_proj = nn.Linear(d, self.value_dim, bias=False)
        self.o_norm = nn.Module()  # named like fla's so the weight maps by name: o_norm.weight
        self.o_norm.weight = nn.Parameter(torch.ones(self.head_v_dim))
        self.o_proj = nn.Linear(self.value_dim, d, bias=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """fla's init of the decay (A in [1, 16], dt log-uniform in [1e-3, 0.1]) and the conv weights."""
        for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d):
            conv.reset_parameters()
        nn.init.ones_(self.o_norm.weight)
        if self.backend == "gated_delta_rule":
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
            self.dt_bias.copy_(softplus_inverse_dt(self.n_heads, 1e-3, 0.1, 1e-4, self.dt_bias.device))

    @property
    def kernel_ops(self) -> tuple[str, ...]:
        # The short convolutions are F.conv1d over each memory's own tokens, not a mixer_kernels/ op.
        return ("delta_rule", "delta_rule_step") if self.backend == "gated_delta_rule" else ("gla", "gla_step")

    def flops_per_token(self, seq_len: int) -> float:
        """Routed as routed: each token goes through top_k memories (each memory's sequence holds top_k / M of
        the tokens, balanced) and the shared one; q is projected once per memory that reads the token."""
        d, hk, hv, h = self.q_proj.in_features, self.head_k_dim, self.head_v_dim, self.n_heads
        gate_dim = h if self.backend == "gated_delta_rule" else self.key_dim
        writes = 2 * linear(d, self.key_dim) + linear(d, self.value_dim) + linear(d, gate_dim)  # q, k, v, decay
        writes += linear(d, h) if self.backend == "gated_delta_rule" else 0  # beta
        conv = 2 * (2 * self.key_dim + self.value_dim) * self.conv_size

        def memory(length: float) -> float:  # one memory over `length` tokens: projections, conv, recurrence
            chunk = chunk_width(self.chunk_size or (DELTA_RULE_CHUNK if self.backend == "gated_delta_rule"
                                                    else GLA_CHUNK), max(1, int(length)))
            if self.backend == "gated_delta_rule":  # WY form: k k^T, T k, T v, q k^T; w S, q S, p v_new, k^T v_new
                recurrence = 6 * chunk * hk + 4 * chunk * hv + 6 * hk * hv
            else:  # p v inside the chunk, q S, k^T v
                recurrence = 2 * chunk * hv + 4 * hk * hv
            return writes + conv + h * recurrence

        routed = self.top_k * memory(seq_len * self.top_k / self.num_memories)
        shared = memory(seq_len) if self.shared_memory else 0
        output = (linear(d, self.value_dim) if self.use_output_gate else 0) + linear(self.value_dim, d)
        return linear(d, self.num_memories) + routed + shared + output

    def init_state(self, batch_size: int, device=None, dtype=None, n_heads: int | None = None) -> MoMState:
        """The empty state of every head, or of `n_heads` of them (a sequence-parallel rank's share)."""
        h, m, w = n_heads or self.n_heads, self.num_memories, self.conv_size - 1
        c = h * (2 * self.head_k_dim + self.head_v_dim)
        zeros = lambda *s, dt=torch.float32: torch.zeros(*s, dtype=dt, device=device)  # noqa: E731
        return MoMState(
            memories=zeros(batch_size, m, h, self.head_k_dim, self.head_v_dim),
            conv=zeros(batch_size, m, c, w, dt=dtype or torch.float32),
            counts=zeros(batch_size, m, dt=torch.long),
            shared=zeros(batch_size, h, self.head_k_dim, self.head_v_dim) if self.shared_memory else None,
            shared_conv=zeros(batch_size, c, w, dt=dtype or torch.float32) if self.shared_memory else None,
        )

    # ------------------------------------------------------------------------------------------------
    # pieces shared by the routed memories and the shared memory
    # ------------------------------------------------------------------------------------------------

    def _rows(self, heads: slice) -> tuple[slice, slice, slice]:
        """Rows of the q/k, v and a projections (and convolutions) that belong to the heads `heads`."""
        hk = slice(heads.start * self.head_k_dim, heads.stop * self.head_k_dim)
        hv = slice(heads.start * self.head_v_dim, heads.stop * self.head_v_dim)
        return hk, hv, heads if self.backend == "gated_delta_rule" else hk  # a: a decay per head, or per key

    def _conv(self, qkv: torch.Tensor, conv_state: torch.Tensor, lengths: torch.Tensor | None, heads: slice):
        """Causal depthwise conv + silu over (N, T, C) inputs continuing from conv_state (N, C, W-1).
        Returns the outputs and the new conv state: the last W-1 inputs before position `lengths`
        (per row; None = T), so rows padded at the end keep the state of their real tokens."""
        hk, hv, _ = self._rows(heads)
        weight = torch.cat([self.q_conv1d.weight[hk], self.k_conv1d.weight[hk], self.v_conv1d.weight[hv]])
        x = torch.cat([conv_state.to(qkv.dtype), qkv.transpose(1, 2)], dim=2)  # (N, C, W-1+T)
        y = F.silu(F.conv1d(x, weight.to(x.dtype), groups=x.shape[1])).transpose(1, 2)  # (N, T, C)
        w = self.conv_size - 1
        if lengths is None:
            new_state = x[:, :, x.shape[2] - w:]
        else:
            idx = lengths[:, None] + torch.arange(w, device=x.device)  # (N, W-1)
            new_state = x.gather(2, idx[:, None, :].expand(-1, x.shape[1], -1))
        return y, new_state

    def _gates(self, a: torch.Tensor, b: torch.Tensor | None, heads: slice):
        """Log decay g and write strength beta from the raw a, b projections (heads split)."""
        if self.backend == "gated_delta_rule":
            g = -self.A_log[heads].float().exp() * F.softplus(a.float() + self.dt_bias[heads].float())  # (..., h)
            return g, b.float().sigmoid()
        return F.logsigmoid(a.float()).unflatten(-1, (-1, self.head_k_dim)) / 16, None

    def _recurrence(self, q, k, v, g, beta, state):
        """(N, T, H, dk) q, k; (N, T, H, dv) v; state (N, H, dk, dv) -> o (N, T, H, dv), state."""
        if self.backend == "gated_delta_rule":
            q, k = (t / torch.sqrt(t.float().pow(2).sum(-1, keepdim=True) + 1e-6).to(t.dtype) for t in (q, k))
            if q.shape[1] == 1:
                o, state = delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state)
                return o[:, None], state
            return chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state, chunk_size=self.chunk_size)
        if q.shape[1] == 1:
            o, state = gla_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], state)
            return o[:, None], state
        return chunk_gla(q, k, v, g, initial_state=state, chunk_size=self.chunk_size)

    def _split_qkv(self, y: torch.Tensor):
        """Convolved q|k|v (..., C) -> q, k (..., h, dk), v (..., h, dv)."""
        n_heads = y.shape[-1] // (2 * self.head_k_dim + self.head_v_dim)
        q, k, v = y.split([n_heads * self.head_k_dim, n_heads * self.head_k_dim, n_heads * self.head_v_dim], dim=-1)
        return (q.unflatten(-1, (n_heads, self.head_k_dim)), k.unflatten(-1, (n_heads, self.head_k_dim)),
                v.unflatten(-1, (n_heads, self.head_v_dim)))

    # ------------------------------------------------------------------------------------------------
    # forward / step
    # ------------------------------------------------------------------------------------------------

    def _route(self, x: torch.Tensor, counts: torch.Tensor):
        """Router: routed (B, T, M) bool, weights (B, T, M) (0 where not routed), new counts, logits."""
        logits = self.gate(x)  # (B, T, M)
        weights, chosen = logits.float().softmax(-1).topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        routed = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, chosen, True)
        if self.capacity is not None:  # first come first served, counting tokens of earlier calls
            routed = routed & (routed.long().cumsum(1) + counts[:, None] <= self.capacity)
        full = torch.zeros_like(logits).scatter(-1, chosen, weights) * routed
        return routed, full, counts + routed.sum(1), logits

    def _aux_loss(self, logits: torch.Tensor) -> torch.Tensor:
        return self.aux_loss_scale * load_balancing_loss(logits.flatten(0, 1), self.top_k)

    def aux_loss_of(self, x: torch.Tensor) -> torch.Tensor:
        """The load-balancing loss over the tokens x (B, T, D): packed documents run one document at a time
        (models/block.py), and the loss is over the whole batch's tokens as in an unpacked forward."""
        return self._aux_loss(self.gate(x))

    # Context parallelism (train/context_parallel.py): the state is handed on piece by piece (its memories'
    # convolution halos and capacity counts have no transition to scan over ranks), and the load-balancing
    # loss is over every piece's tokens.
    cp_relay = True

    def cp_aux_loss(self, x: torch.Tensor, total) -> torch.Tensor:
        return self.aux_loss_scale * load_balancing_loss(self.gate(x).flatten(0, 1), self.top_k, total)

    def forward(self, x: torch.Tensor, state: MoMState | None = None) -> tuple[torch.Tensor, MoMState]:
        state = self.init_state(x.shape[0], x.device, x.dtype) if state is None else state
        out, new_state = self._memories(x, state, slice(0, self.n_heads))
        return self._out(out, x), new_state

    # Sequence parallelism (train/sequence_parallel.py). A memory reads the tokens routed to it from anywhere
    # in the sequence, so each rank gathers the whole sequence x and runs every memory for its share of the
    # heads (convolutions, gates and recurrences are per head; the router is replicated, so every rank
    # routes, and computes the load-balancing loss, over all tokens). One all-to-all brings the heads'
    # outputs back to the local tokens. Why not the usual all-to-all of projections: a rank receives
    # (sp-1)/sp * T * D numbers of x per sequence, but (sp-1)/sp * T/sp * W of projections, W = q plus k, v
    # and gates of every memory (5.5 D in configs/mom_1.3b.yaml: more than the gather for any SP size up to
    # its 4 heads), and every rank would project every token for every memory, not just its top_k.
    def sp_head_counts(self) -> dict[str, int]:
        return {"model.n_heads": self.n_heads}

    def sp_forward(self, x: torch.Tensor, sp, docs=None) -> torch.Tensor:
        """This rank's tokens x (B, T/sp, D) -> y (B, T/sp, D); `docs`: packed documents over the whole rows
        (each on fresh memories; the load-balancing loss over every token of the batch)."""
        heads = sp.local(self.n_heads)

        def memories(xs):
            state = self.init_state(xs.shape[0], xs.device, xs.dtype, n_heads=heads.stop - heads.start)
            return self._memories(xs, state, heads)[0]  # (B, T, h, dv)

        whole = sp.all_gather(x)
        out = memories(whole) if docs is None else per_document(memories, whole, docs)
        if docs is not None:
            self.aux_loss = self.aux_loss_of(whole)
        return self._out(sp.heads_to_seq(out), x)

    def _memories(self, x: torch.Tensor, state: MoMState, heads: slice) -> tuple[torch.Tensor, MoMState]:
        """Route every token of x (B, T, D), run each memory (and the shared one) over its tokens for the
        heads `heads` (all of them without sequence parallelism; `state` holds just those) and sum the
        outputs by routing weight: (B, T, h, dv), new state. Sets `self.aux_loss`."""
        B, T, _ = x.shape
        M = self.num_memories
        hk, hv, ha = self._rows(heads)
        routed, weights, counts, logits = self._route(x, state.counts)
        self.aux_loss = self._aux_loss(logits)

        # Each memory's subsequence, in time order and padded at the end: (M, B, Tm) token indices.
        r = routed.permute(2, 0, 1)  # (M, B, T)
        lengths = r.sum(-1)  # (M, B)
        Tm = max(int(lengths.max()), 1)
        idx = torch.argsort((~r).to(torch.int8), dim=-1, stable=True)[..., :Tm]  # routed tokens first
        valid = torch.arange(Tm, device=x.device) < lengths[..., None]  # (M, B, Tm)
        xs = x[None].expand(M, -1, -1, -1).gather(2, idx[..., None].expand(-1, -1, -1, x.shape[-1]))

        # Per-memory projections (stacked weights), then the convolutions over each subsequence.
        proj = lambda mods, rows: torch.einsum(  # noqa: E731
            "mbtd,mkd->mbtk", xs, torch.stack([mod.weight[rows] for mod in mods]))
        qkv = torch.cat([F.linear(xs, self.q_proj.weight[hk]), proj(self.k_proj, hk), proj(self.v_proj, hv)],
                        dim=-1)  # (M, B, Tm, C)
        conv_state = state.conv.transpose(0, 1).flatten(0, 1)  # (M*B, C, W-1)
        y, conv_new = self._conv(qkv.flatten(0, 1), conv_state, lengths.flatten(), heads)
        q, k, v = self._split_qkv(y)  # (M*B, Tm, h, d)
        b = proj(self.b_proj, heads).flatten(0, 1) if hasattr(self, "b_proj") else None
        g, beta = self._gates(proj(self.a_proj, ha).flatten(0, 1), b, heads)
        # Padding after a memory's last token must not touch its state: no decay, no write.
        keep = valid.flatten(0, 1)[:, :, None]  # (M*B, Tm, 1)
        g = torch.where(keep if g.dim() == 3 else keep[..., None], g, 0.0)
        k = torch.where(keep[..., None], k, 0.0)
        beta = None if beta is None else torch.where(keep, beta, 0.0)
        mem_state = state.memories.transpose(0, 1).flatten(0, 1)  # (M*B, h, dk, dv)
        o, mem_new = self._recurrence(q, k, v, g, beta, mem_state)  # (M*B, Tm, h, dv)

        # Back to token order: out[b, t] = sum over memories e that took t of weight[b, t, e] * o_e.
        o = o.unflatten(0, (M, B)).flatten(-2)  # (M, B, Tm, h*dv)
        # Padding rows add weight 0 (not dropped by a boolean index, which would read the count back to the host).
        w = weights.permute(2, 0, 1).gather(2, idx) * valid  # (M, B, Tm)
        flat = (torch.arange(B, device=x.device)[None, :, None] * T + idx).flatten()
        out = torch.zeros(B * T, o.shape[-1], dtype=o.dtype, device=x.device)
        out = out.index_add(0, flat, (o * w[..., None].to(o.dtype)).flatten(0, 2)).view(B, T, -1, self.head_v_dim)

        shared, shared_conv = state.shared, state.shared_conv
        if self.shared_memory:
            o_shared, shared, shared_conv = self._shared(x, state, heads)
            out = out + o_shared
        new_state = MoMState(
            memories=mem_new.unflatten(0, (M, B)).transpose(0, 1),
            conv=conv_new.unflatten(0, (M, B)).transpose(0, 1),
            counts=counts, shared=shared, shared_conv=shared_conv,
        )
        return out, new_state

    def _shared(self, x: torch.Tensor, state: MoMState, heads: slice):
        """The memory every token goes through: (B, T, h, dv) outputs, its state and conv state."""
        hk, hv, ha = self._rows(heads)
        qkv = torch.cat([F.linear(x, self.q_proj.weight[hk]), F.linear(x, self.shared_k.weight[hk]),
                         F.linear(x, self.shared_v.weight[hv])], dim=-1)
        y, conv_new = self._conv(qkv, state.shared_conv, None, heads)
        q, k, v = self._split_qkv(y)
        b = F.linear(x, self.shared_b.weight[heads]) if hasattr(self, "shared_b") else None
        g, beta = self._gates(F.linear(x, self.shared_a.weight[ha]), b, heads)
        o, shared = self._recurrence(q, k, v, g, beta, state.shared)
        return o, shared, conv_new

    def _out(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-head RMSNorm, gate silu(g_proj(x)), then o_proj. o (..., H, dv), x (..., d_model)."""
        o32 = o.float()
        o32 = o32 * torch.rsqrt(o32.pow(2).mean(-1, keepdim=True) + self.norm_eps) * self.o_norm.weight.float()
        if self.use_output_gate:
            o32 = o32 * F.silu(self.g_proj(x).float()).unflatten(-1, (self.n_heads, self.head_v_dim))
        return self.o_proj(o32.flatten(-2).to(x.dtype))

    def step(self, x_t: torch.Tensor, state: MoMState) -> tuple[torch.Tensor, MoMState]:
        """One token: the forward on a length-1 sequence (constant memory; memories not chosen by the
        router are left untouched, as padding)."""
        y, state = self.forward(x_t[:, None], state)
        self.aux_loss = None  # decoding has no loss to add to
        return y[:, 0], state
