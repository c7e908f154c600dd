"""The Mamba-2 token mixer (Dao & Gu, 2024), laid out exactly as transformers' `Mamba2Mixer`.

Per layer: one in_proj to (z, xBC, dt); depthwise causal conv (with bias) and SiLU over xBC, split into
x (heads of headdim channels), B and C (n_groups each); SSD with a scalar decay A = -exp(A_log) per
head, dt = softplus(dt + dt_bias) and the skip D (mixer_kernels/ssd); a gated RMSNorm per group,
RMSNorm(y * silu(z)); out_proj. Parameter names and shapes equal transformers' (and mamba-ssm's
`Mamba2` without its optional extra MLP), so models/hf/mamba2.py maps weights one to one.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from mixer_kernels.ssd import ssd, ssd_step
from mixer_kernels.ssd.reference import process_dt
from models.config import ModelConfig
from models.flops import chunk_width, linear
from models.mixers.mamba import ShortConv, SSMState, exclude_from_weight_decay, softplus_inverse_dt


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) per group of channels, fp32 (mamba-ssm's RMSNormGated, norm_before_gate=False)."""

    def __init__(self, dim: int, group_size: int, eps: float):
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y, z (..., dim) -> (..., dim) in y's dtype."""
        h = (y.float() * F.silu(z.float())).unflatten(-1, (-1, self.group_size))  # (..., groups, group_size)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.flatten(-2).to(y.dtype)


class Mamba2Mixer(nn.Module):
    kernel_ops = ("causal_conv1d", "ssd", "causal_conv1d_update", "ssd_step")

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        m = self.cfg = cfg.mamba2
        self.n_layers, self.init_std = cfg.n_layers, cfg.init_std
        self.d_inner = m.expand * cfg.d_model
        if self.d_inner % m.headdim or (self.d_inner // m.headdim) % m.n_groups:
            raise ValueError(
                f"mamba2: d_inner = expand * d_model = {self.d_inner} must split into heads of "
                f"mamba2.headdim={m.headdim} whose number divides by mamba2.n_groups={m.n_groups}; "
                "change d_model, expand, headdim or n_groups"
            )
        self.n_heads = self.d_inner // m.headdim
        self.bc_dim = m.n_groups * m.d_state  # width of B and of C
        conv_dim = self.d_inner + 2 * self.bc_dim
        # One projection to z (d_inner), xBC (conv_dim) and dt (heads).
        self.in_proj = nn.Linear(cfg.d_model, self.d_inner + conv_dim + self.n_heads, bias=m.bias)
        self.conv1d = ShortConv(conv_dim, m.d_conv, m.conv_bias)
        # Input-independent SSM parameters, one per head: registered Parameters so ZeRO-3 partitions them.
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // m.n_groups, cfg.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=m.bias)
        exclude_from_weight_decay(self, ("dt_bias", "A_log", "D"))

    @torch.no_grad()
    def init_weights(self) -> None:
        """mamba-ssm's `Mamba2` init over the generic one."""
        m = self.cfg
        self.A_log.copy_(torch.log(torch.empty_like(self.A_log).uniform_(*m.A_init_range)))
        self.D.fill_(1.0)
        self.dt_bias.copy_(softplus_inverse_dt(self.n_heads, m.dt_min, m.dt_max, m.dt_init_floor))
        self.conv1d.reset_parameters()  # PyTorch's default conv init, as in mamba-ssm
        self.norm.weight.fill_(1.0)
        # Residual branches add up over depth: shrink the projection back into the stream (GPT-2 style).
        nn.init.normal_(self.out_proj.weight, std=self.init_std / math.sqrt(self.n_layers))

    @property
    def A(self) -> torch.Tensor:
        return -torch.exp(self.A_log.float())  # (heads,)

    def flops_per_token(self, seq_len: int) -> int:
        m, di = self.cfg, self.d_inner
        chunk = chunk_width(m.chunk_size, seq_len)
        # SSD: C B^T per group inside the chunk, then per head its product with x, x^T B into the chunk state and
        # C times the state entering the chunk.
        ssd = m.n_groups * 2 * chunk * m.d_state + self.n_heads * (2 * chunk * m.headdim + 4 * m.headdim * m.d_state)
        return (linear(self.in_proj.in_features, self.in_proj.out_features) + 2 * self.conv1d.in_channels * m.d_conv
                + ssd + linear(di, self.out_proj.out_features))

    def _scan_args(self, xbc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """xbc (..., conv_dim) -> x (..., heads, headdim), B, C (..., n_groups, d_state)."""
        x, B, C = xbc.split([self.d_inner, self.bc_dim, self.bc_dim], dim=-1)
        groups = (self.cfg.n_groups, self.cfg.d_state)
        x = x.unflatten(-1, (self.n_heads, self.cfg.headdim))
        return x, B.unflatten(-1, groups), C.unflatten(-1, groups)

    def init_state(self, batch_size: int, device=None, dtype=None) -> SSMState:
        m = self.cfg
        ssm = torch.zeros(batch_size, self.n_heads, m.headdim, m.d_state, device=device, dtype=torch.float32)
        return SSMState(self.conv1d.init_state(batch_size, device, dtype), ssm)

    # Sequence parallelism (train/sequence_parallel.py), as Megatron splits Mamba-2 over tensor-parallel
    # ranks: heads, and the groups of B and C they read, are independent once xBC is split by head, and the
    # depthwise convolution runs after the split on each rank's own channels, so no state crosses a shard.
    def sp_head_counts(self) -> dict[str, int]:
        return {"Mamba-2 heads (expand * d_model / headdim)": self.n_heads, "mamba2.n_groups": self.cfg.n_groups}

    def sp_forward(self, x: torch.Tensor, sp, docs=None) -> torch.Tensor:
        """This rank's tokens x (B, T/sp, d_model) -> y (B, T/sp, d_model); `docs`: packed documents over the
        whole rows."""
        m = self.cfg
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.conv1d.in_channels, self.n_heads], dim=-1)
        # Whole sequences of our heads (B, T, h, P), their groups' B and C (B, T, g, N) and dt (B, T, h).
        whole = [sp.seq_to_heads(t) for t in (*self._scan_args(xbc), dt)]
        heads, groups = sp.local(self.n_heads), sp.local(m.n_groups)
        x_ch, b_ch, c_ch = torch.arange(self.conv1d.in_channels, device=x.device).split(
            [self.d_inner, self.bc_dim, self.bc_dim])
        channels = torch.cat([x_ch.view(self.n_heads, -1)[heads].flatten(), b_ch.view(m.n_groups, -1)[groups].flatten(),
                              c_ch.view(m.n_groups, -1)[groups].flatten()])

        xs, B, C, dt = whole
        seq_idx = None if docs is None else docs.seq_idx  # over the whole rows, as whole is
        xs, B, C = (t.flatten(-2) for t in (xs, B, C))
        xbc, _ = self.conv1d(torch.cat([xs, B, C], dim=-1), None, channels, seq_idx)
        xs, B, C = xbc.split([xs.shape[-1], B.shape[-1], C.shape[-1]], dim=-1)
        y, _ = ssd(
            xs.unflatten(-1, (-1, m.headdim)), dt, self.A[heads], B.unflatten(-1, (-1, m.d_state)),
            C.unflatten(-1, (-1, m.d_state)), m.chunk_size, D=self.D[heads], dt_bias=self.dt_bias[heads],
            dt_softplus=True, dt_limit=m.dt_limit, seq_idx=seq_idx,
        )
        y = sp.heads_to_seq(y)  # (B, T/sp, H, P)
        return self.out_proj(self.norm(y.flatten(-2), z))

    def forward(self, x: torch.Tensor, state: SSMState | None = None, seq_idx: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, SSMState]:
        """x (B, T, d_model) -> y (B, T, d_model), state after the last token. `seq_idx` (B, T): packed
        documents (causal-conv1d's and mamba-ssm's varlen form), each on a fresh state."""
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.conv1d.in_channels, self.n_heads], dim=-1)
        xbc, conv_state = self.conv1d(xbc, None if state is None else state.conv, seq_idx=seq_idx)
        xs, B, C = self._scan_args(xbc)  # (B, T, H, P), (B, T, G, N) x2
        y, ssm_state = ssd(
            xs, dt, self.A, B, C, self.cfg.chunk_size, D=self.D, dt_bias=self.dt_bias, dt_softplus=True,
            dt_limit=self.cfg.dt_limit, initial_state=None if state is None else state.ssm, seq_idx=seq_idx,
        )
        y = self.norm(y.flatten(-2), z)  # (B, T, d_inner)
        return self.out_proj(y), SSMState(conv_state, ssm_state)

    def forward_packed(self, x: torch.Tensor, docs) -> torch.Tensor:
        """Packed documents in one call over the rows: the convolution and the SSD take `seq_idx`."""
        return Mamba2Mixer.forward(self, x, seq_idx=docs.seq_idx)[0]  # not self(): a CP wrapper's forward takes no seq_idx

    # Context parallelism (train/context_parallel.py): the SSM state decays by exp(A sum(dt)) per head over a
    # piece; the convolution starts from the previous piece's last d_conv - 1 inputs.
    @property
    def cp_halo_tokens(self) -> int:
        return self.cfg.d_conv - 1

    def _conv_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return self.in_proj(x).split([self.d_inner, self.conv1d.in_channels, self.n_heads], dim=-1)[1]

    def cp_empty(self, x: torch.Tensor, tail: torch.Tensor) -> SSMState:
        m = self.cfg
        ssm = torch.zeros(x.shape[0], self.n_heads, m.headdim, m.d_state, device=x.device, dtype=torch.float32)
        return SSMState(self._conv_inputs(tail).transpose(1, 2), ssm)

    def cp_transition(self, x: torch.Tensor, tail, sp=None) -> tuple[torch.Tensor]:
        bias = self.in_proj.bias
        dt = F.linear(x, self.in_proj.weight[-self.n_heads:], None if bias is None else bias[-self.n_heads:])
        dt = process_dt(dt, self.dt_bias, True, self.cfg.dt_limit)  # (B, T, H) as the SSD sees it
        return ((self.A * dt.sum(1)).exp(),)  # (B, H)

    @staticmethod
    def cp_carry(state: SSMState, own: SSMState, transition) -> SSMState:
        return SSMState(own.conv, own.ssm + transition[0][..., None, None] * state.ssm)

    def step(self, x_t: torch.Tensor, state: SSMState) -> tuple[torch.Tensor, SSMState]:
        """x_t (B, d_model) -> y_t (B, d_model), state after this token."""
        z, xbc, dt = self.in_proj(x_t).split([self.d_inner, self.conv1d.in_channels, self.n_heads], dim=-1)
        xbc, conv_state = self.conv1d.step(xbc, state.conv)
        xs, B, C = self._scan_args(xbc)  # (B, H, P), (B, G, N) x2
        y, ssm_state = ssd_step(
            state.ssm, xs, dt, self.A, B, C, D=self.D, dt_bias=self.dt_bias, dt_softplus=True,
            dt_limit=self.cfg.dt_limit,
        )
        return self.out_proj(self.norm(y.flatten(-2), z)), SSMState(conv_state, ssm_state)
