"""The mLSTM token mixer of xLSTM-7B (Beck et al., 2025), laid out like NX-AI's `mLSTMLayer`.

Per layer: q, k (qk_dim_factor * d_model), v and the output gate (v_dim_factor * d_model) from linear
maps of the normed input; one scalar input and forget gate per head from linear maps with biases,
soft-capped; the matrix-memory cell (mixer_kernels/mlstm); a per-head LayerNorm (weight, no bias); the
sigmoid output gate; the out projection. Parameter shapes and order match transformers'
`xLSTMLayer`, so models/hf/xlstm.py maps weights one to one.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from mixer_kernels.mlstm import MLSTMState, mlstm_chunkwise, mlstm_recurrent_step, zero_state
from mixer_kernels.varlen import RESET
from models.config import ModelConfig
from models.flops import chunk_width, linear


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return cap * torch.tanh(x / cap)


class MultiHeadLayerNorm(nn.Module):
    """LayerNorm over each head's features (no bias), then one weight over all heads' features.

    NX-AI's and transformers' multi-head norm: mean-centred (a LayerNorm, not an RMSNorm), reduced in
    fp32 and cast back before the weight is applied.
    """

    def __init__(self, n_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_heads * head_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: (..., NH, DH) -> (..., NH * DH)."""
        y = F.layer_norm(h.float(), h.shape[-1:], eps=self.eps).to(h.dtype)
        return y.flatten(-2) * self.weight


class MLSTMMixer(nn.Module):
    kernel_ops = ("mlstm", "mlstm_step")

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.mlstm_cfg = m = cfg.mlstm
        self.n_layers = cfg.n_layers
        self.n_heads = cfg.n_heads
        qk_dim, v_dim = cfg.d_model * m.qk_dim_factor, cfg.d_model * m.v_dim_factor
        for name, width in (("qk_dim_factor", qk_dim), ("v_dim_factor", v_dim)):
            if width != int(width) or int(width) % cfg.n_heads:
                raise ValueError(
                    f"model.d_model * mlstm.{name} = {width} must be a whole multiple of "
                    f"model.n_heads={cfg.n_heads}; change d_model, n_heads or mlstm.{name}"
                )
        qk_dim, v_dim = int(qk_dim), int(v_dim)
        self.qk_head_dim, self.v_head_dim = qk_dim // cfg.n_heads, v_dim // cfg.n_heads
        self.q_proj = nn.Linear(cfg.d_model, qk_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, qk_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, v_dim, bias=False)
        self.o_gate = nn.Linear(cfg.d_model, v_dim, bias=False)
        self.i_gate = nn.Linear(cfg.d_model, cfg.n_heads, bias=True)
        self.f_gate = nn.Linear(cfg.d_model, cfg.n_heads, bias=True)
        self.head_norm = MultiHeadLayerNorm(cfg.n_heads, self.v_head_dim, cfg.norm_eps)
        self.out_proj = nn.Linear(v_dim, cfg.d_model, bias=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """NX-AI's xLSTM-7B init (transformers' `xLSTMPreTrainedModel._init_weights`)."""
        # Gates start input-independent: a strongly negative input gate keeps early writes small and the
        # forget-gate biases spread the heads' memory horizons (sigmoid(3..6) = 0.95..0.998).
        for gate in (self.i_gate, self.f_gate):
            nn.init.zeros_(gate.weight)
        nn.init.constant_(self.i_gate.bias, self.mlstm_cfg.igate_bias_init)
        first, last = self.mlstm_cfg.fgate_bias_init
        self.f_gate.bias.copy_(torch.linspace(first, last, self.n_heads))
        # Wang init (GPT-NeoX) on the projection back into the residual stream: shrinks with depth.
        d_model = self.out_proj.out_features
        nn.init.normal_(self.out_proj.weight, std=2 / self.n_layers / math.sqrt(d_model))

    def flops_per_token(self, seq_len: int) -> int:
        d, qk, v = self.q_proj.in_features, self.q_proj.out_features, self.v_proj.out_features
        projections = 2 * linear(d, qk) + 2 * linear(d, v) + 2 * linear(d, self.n_heads) + linear(v, d)
        dqk, dv, chunk = self.qk_head_dim, self.v_head_dim, chunk_width(self.mlstm_cfg.chunk_size, seq_len)
        # Per head: q.k and s.[v, 1] inside the chunk, q.[C, n] from the chunk-start state, k^T [v, 1] into
        # the state (the normaliser n rides as a column of ones beside v).
        cell = 2 * chunk * (dqk + dv + 1) + 4 * dqk * (dv + 1)
        return projections + self.n_heads * cell

    def init_state(self, batch_size: int, device=None, dtype=None) -> MLSTMState:
        """The empty memory: C = n = 0 and stabiliser m = 0, always fp32 (dtype is ignored)."""
        return zero_state(batch_size, self.n_heads, self.qk_head_dim, self.v_head_dim, device)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (..., D) -> q, k (..., NH, DQK); v (..., NH, DV); soft-capped gates i, f (..., NH)."""
        heads = x.shape[:-1] + (self.n_heads, -1)
        q = self.q_proj(x).view(heads)
        k = self.k_proj(x).view(heads)
        v = self.v_proj(x).view(heads)
        cap = self.mlstm_cfg.gate_soft_cap
        return q, k, v, soft_cap(self.i_gate(x), cap), soft_cap(self.f_gate(x), cap)

    def _output(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """x (..., D), cell output h (..., NH, DV) -> mixer output (..., D)."""
        return self.out_proj(torch.sigmoid(self.o_gate(x)) * self.head_norm(h))

    # Sequence parallelism (train/sequence_parallel.py) runs project and output on local tokens and `mix`
    # on whole sequences of a subset of heads: the mLSTM cell is independent across heads.
    def sp_head_counts(self) -> dict[str, int]:
        return {"model.n_heads": self.n_heads}

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (B, T, D) -> q, k (B, T, NH, DQK); v (B, T, NH, DV); i, f (B, T, NH)."""
        return self._project(x)

    def mix(self, q, k, v, i, f) -> torch.Tensor:
        """Whole sequences of some heads -> h (B, T, NH, DV)."""
        return self._cell(q, k, v, i, f, None)[0]

    def mix_packed(self, q, k, v, i, f, docs) -> torch.Tensor:
        """`mix` of packed documents in one call: the mLSTM kernels take cu_seqlens (mixer_kernels/varlen.py), each
        document a fresh sequence, stabiliser included."""
        h, _ = self._cell(*map(docs.flat, (q, k, v, i, f)), None, docs.cu_seqlens)
        return docs.rows(h)

    def forward_packed(self, x: torch.Tensor, docs) -> torch.Tensor:
        return self.output(self.mix_packed(*self.project(x), docs), x)

    def _cell(self, q, k, v, i, f, state: MLSTMState | None, cu_seqlens=None) -> tuple[torch.Tensor, MLSTMState]:
        h, state = mlstm_chunkwise(
            q.transpose(1, 2),  # (B, NH, T, DQK)
            k.transpose(1, 2),
            v.transpose(1, 2),  # (B, NH, T, DV)
            i.transpose(1, 2),  # (B, NH, T)
            f.transpose(1, 2),
            initial_state=state,
            chunk_size=self.mlstm_cfg.chunk_size,
            eps=self.mlstm_cfg.eps,
            cu_seqlens=cu_seqlens,
        )
        return h.transpose(1, 2), state  # h back to (B, T, NH, DV)

    def output(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._output(x, h)

    def forward(self, x: torch.Tensor, state: MLSTMState | None = None) -> tuple[torch.Tensor, MLSTMState]:
        q, k, v, i, f = self.project(x)
        h, state = self._cell(q, k, v, i, f, state)
        return self.output(h, x), state

    # Context parallelism (train/context_parallel.py). C and n are stored divided by exp(m), and the
    # unstabilised state is linear: over a piece, exp(m) C -> exp(F) exp(m0) C0 + (the piece's own writes),
    # F the piece's summed log forget gates. A piece's own contribution starts from an empty state whose
    # stabiliser is RESET (exp underflows to 0), so its final m is the max over the piece's own writes alone,
    # and the true m is max(F + m0, that): both combine exactly in log space.
    # The exchange runs on the cell of the heads `project` gives (all, or a Ulysses rank's share).
    cp_halo_tokens = 0

    def cp_core(self, heads, state: MLSTMState | None, sp=None, docs=None):
        """The cell on whole pieces of these heads from `state`, or (`docs`) on packed documents, each fresh."""
        return self._cell(*heads, state) if docs is None else (self.mix_packed(*heads, docs), None)

    def cp_zeros(self, heads) -> MLSTMState:
        q, _, v, _, _ = heads  # (B, T, h, DQK), (B, T, h, DV)
        return zero_state(q.shape[0], q.shape[2], q.shape[3], v.shape[3], q.device)

    def cp_empty(self, heads, tail) -> MLSTMState:
        c, n, m = self.cp_zeros(heads)
        return c, n, m.fill_(RESET)

    def cp_transition(self, heads, tail, sp=None) -> tuple[torch.Tensor]:
        f = heads[4]  # (B, T, h) soft-capped pre-activations
        return (F.logsigmoid(f.float()).sum(1)[..., None],)  # (B, h, 1)

    @staticmethod
    def cp_carry(state: MLSTMState, own: MLSTMState, transition) -> MLSTMState:
        (c0, n0, m0), (c, n, m), (log_f,) = state, own, transition
        m_new = torch.maximum(log_f + m0, m)
        old, new = torch.exp(log_f + m0 - m_new), torch.exp(m - m_new)  # (B, NH, 1)
        return old[..., None] * c0 + new[..., None] * c, old * n0 + new * n, m_new

    def step(self, x_t: torch.Tensor, state: MLSTMState) -> tuple[torch.Tensor, MLSTMState]:
        q, k, v, i, f = self._project(x_t)  # (B, NH, DQK) ... (B, NH)
        h, state = mlstm_recurrent_step(q, k, v, i, f, state, eps=self.mlstm_cfg.eps)  # h (B, NH, DV)
        return self._output(x_t, h), state
