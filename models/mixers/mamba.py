"""The Mamba-1 token mixer (Gu & Dao, 2023), laid out exactly as transformers' `MambaMixer`.

Per layer: in_proj to (x, z); depthwise causal conv (with bias) and SiLU on x; x_proj to (dt, B, C);
dt_proj up to d_inner (its bias is added with the softplus inside the scan); the selective scan with
A = -exp(A_log) and the skip D, gated by silu(z); out_proj. Parameter names and shapes equal
transformers' (and mamba-ssm's `Mamba`), so models/hf/mamba.py maps weights one to one.

Also owns what Mamba-2 (models/mixers/mamba2.py) shares with it: the state container, the short
convolution with its state, the dt initialisation and the no-weight-decay marks.

In `forward` every parameter is read inside the forward of the module that owns it (hence ShortConv and
DtProj), where ZeRO-3 gathers it ahead of time. The sequence-parallel path slices some of them in the
mixer's own forward: inside the DeepSpeed engine's forward, ZeRO-3 gathers such a parameter on first access
and registers it as an external parameter of the running module (tested with every parameter partitioned).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mixer_kernels.causal_conv1d import causal_conv1d, causal_conv1d_update
from mixer_kernels.selective_scan import selective_scan, selective_state_update
from models.config import ModelConfig
from models.documents import per_document
from models.flops import linear


@dataclass
class SSMState:
    conv: torch.Tensor  # (B, conv channels, d_conv - 1): the last inputs of the causal conv, activation dtype
    ssm: torch.Tensor  # fp32; Mamba: (B, d_inner, d_state), Mamba-2: (B, heads, headdim, d_state)


class ShortConv(nn.Conv1d):
    """Depthwise causal convolution with SiLU over (B, T, C), carrying the last d_conv - 1 inputs as state.

    An nn.Conv1d so its weight (C, 1, W), bias and key `conv1d.weight` are those of transformers and
    mamba-ssm; the computation goes through mixer_kernels/causal_conv1d.
    """

    def __init__(self, channels: int, width: int, bias: bool):
        super().__init__(channels, channels, width, groups=channels, padding=width - 1, bias=bias)

    def forward(
        self, x: torch.Tensor, state: torch.Tensor | None = None, channels: torch.Tensor | slice | None = None,
        seq_idx: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """x (B, T, C) -> y (B, T, C), state (B, C, W-1). `channels` (indices or a slice): x holds only those
        channels (a sequence-parallel rank's share); sliced here, inside forward, where ZeRO-3 has gathered
        the weight. `seq_idx` (B, T): packed documents' index per token (no tap crosses a boundary)."""
        weight, bias = self.weight.squeeze(1), self.bias  # (C, W), (C,)
        if channels is not None:
            weight, bias = weight[channels], None if bias is None else bias[channels]
        # (B, C, T) view of a (B, T, C) tensor: the channel-last layout causal-conv1d carries states in.
        y, state = causal_conv1d(x.transpose(1, 2), weight, bias, state, activation="silu", seq_idx=seq_idx)
        return y.transpose(1, 2), state

    def step(self, x_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t (B, C) -> y_t (B, C), new state."""
        return causal_conv1d_update(x_t, state, self.weight.squeeze(1), self.bias, activation="silu")

    def init_state(self, batch_size: int, device=None, dtype=None) -> torch.Tensor:
        return torch.zeros(batch_size, self.in_channels, self.kernel_size[0] - 1, device=device, dtype=dtype)


class DtProj(nn.Linear):
    """Mamba-1's dt_proj (rank dt_rank -> d_inner). Returns W x and the bias apart, the bias in fp32: the scan
    adds it inside the softplus in fp32, as mamba-ssm does. Called as a module, so that ZeRO-3 gathers both
    parameters (it gathers a module's parameters when that module's forward runs)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.linear(x, self.weight), self.bias.to(torch.float32, copy=True)


def softplus_inverse_dt(n: int, dt_min: float, dt_max: float, floor: float, device=None) -> torch.Tensor:
    """n biases b with softplus(b) = dt, dt log-uniform in [dt_min, dt_max], at least `floor` (mamba-ssm)."""
    log_dt = torch.rand(n, device=device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = torch.exp(log_dt).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))  # softplus^-1(dt) = log(exp(dt) - 1), stable for small dt


def exclude_from_weight_decay(module: nn.Module, names: tuple[str, ...]) -> None:
    """Mark `module.<name>` parameters `_no_weight_decay` (the optimizer builder reads the mark), now and
    after every load_state_dict: loading with assign=True replaces Parameter objects and their attributes."""

    def mark(*_):
        for name in names:
            getattr(module, name)._no_weight_decay = True

    mark()
    module.register_load_state_dict_post_hook(mark)


class MambaMixer(nn.Module):
    kernel_ops = ("causal_conv1d", "selective_scan", "causal_conv1d_update", "selective_state_update")

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        m = self.cfg = cfg.mamba
        self.n_layers, self.init_std = cfg.n_layers, cfg.init_std
        self.d_inner = m.expand * cfg.d_model
        self.dt_rank = m.dt_rank or math.ceil(cfg.d_model / 16)
        self.in_proj = nn.Linear(cfg.d_model, 2 * self.d_inner, bias=m.bias)
        self.conv1d = ShortConv(self.d_inner, m.d_conv, m.conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * m.d_state, bias=False)
        self.dt_proj = DtProj(self.dt_rank, self.d_inner, bias=True)
        # Input-independent SSM parameters: registered Parameters so ZeRO-3 partitions them like any other.
        self.A_log = nn.Parameter(torch.empty(self.d_inner, m.d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=m.bias)
        exclude_from_weight_decay(self, ("A_log", "D"))

    @torch.no_grad()
    def init_weights(self) -> None:
        """mamba-ssm's `Mamba` init (transformers' `MambaMixer.init_mamba_weights`) over the generic one."""
        m = self.cfg
        # S4D-real: A[d, n] = -(n + 1), so the state holds a spread of time scales.
        self.A_log.copy_(torch.log(torch.arange(1, m.d_state + 1, dtype=torch.float32)).expand_as(self.A_log))
        self.D.fill_(1.0)
        std = m.dt_scale / math.sqrt(self.dt_rank)
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        self.dt_proj.bias.copy_(softplus_inverse_dt(self.d_inner, m.dt_min, m.dt_max, m.dt_init_floor))
        self.conv1d.reset_parameters()  # PyTorch's default conv init, as in mamba-ssm
        # Residual branches add up over depth: shrink the projection back into the stream (GPT-2 style).
        nn.init.normal_(self.out_proj.weight, std=self.init_std / math.sqrt(self.n_layers))

    @property
    def A(self) -> torch.Tensor:
        return -torch.exp(self.A_log.float())  # (d_inner, d_state)

    def flops_per_token(self, seq_len: int) -> int:
        m, di = self.cfg, self.d_inner
        return (linear(self.in_proj.in_features, 2 * di) + 2 * di * m.d_conv + linear(di, self.dt_rank + 2 * m.d_state)
                + linear(self.dt_rank, di) + 2 * di * m.d_state + linear(di, self.out_proj.out_features))  # y = <h, C>

    def _scan_inputs(self, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """u (..., d_inner) -> dt (..., d_inner), B, C (..., d_state), dt's fp32 bias (d_inner,)."""
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.cfg.d_state, self.cfg.d_state], dim=-1)
        dt, dt_bias = self.dt_proj(dt)
        return dt, B, C, dt_bias

    def init_state(self, batch_size: int, device=None, dtype=None) -> SSMState:
        ssm = torch.zeros(batch_size, self.d_inner, self.cfg.d_state, device=device, dtype=torch.float32)
        return SSMState(self.conv1d.init_state(batch_size, device, dtype), ssm)

    def forward(self, x: torch.Tensor, state: SSMState | None = None) -> tuple[torch.Tensor, SSMState]:
        """x (B, T, d_model) -> y (B, T, d_model), state after the last token."""
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (B, T, d_inner) each
        u, conv_state = self.conv1d(u, None if state is None else state.conv)
        dt, B, C, dt_bias = self._scan_inputs(u)
        # The scan takes mamba-ssm's channel-first layout: (B, d_inner, T) and (B, d_state, T).
        y, ssm_state = selective_scan(
            u.transpose(1, 2), dt.transpose(1, 2), self.A, B.transpose(1, 2), C.transpose(1, 2),
            D=self.D.float(), z=z.transpose(1, 2), delta_bias=dt_bias, delta_softplus=True,
            initial_state=None if state is None else state.ssm,
        )
        return self.out_proj(y.transpose(1, 2)), SSMState(conv_state, ssm_state)

    # Context parallelism (train/context_parallel.py): the SSM state decays by exp(A * sum(dt)) per channel and
    # state dimension over a piece; the convolution starts from the previous piece's last d_conv - 1 inputs.
    @property
    def cp_halo_tokens(self) -> int:
        return self.cfg.d_conv - 1

    def _conv_state(self, tail: torch.Tensor | None) -> torch.Tensor | None:
        return None if tail is None else self.in_proj(tail).chunk(2, dim=-1)[0].transpose(1, 2)

    def cp_empty(self, x: torch.Tensor, tail: torch.Tensor) -> SSMState:
        ssm = torch.zeros(x.shape[0], self.d_inner, self.cfg.d_state, device=x.device, dtype=torch.float32)
        return SSMState(self._conv_state(tail), ssm)

    def cp_transition(self, x: torch.Tensor, tail, sp=None) -> tuple[torch.Tensor]:
        bias = self.in_proj.bias  # the u half of in_proj only
        u = F.linear(x, self.in_proj.weight[:self.d_inner], None if bias is None else bias[:self.d_inner])
        u, _ = self.conv1d(u, self._conv_state(tail))
        dt, _, _, dt_bias = self._scan_inputs(u)
        dt = F.softplus(dt.float() + dt_bias).sum(1)  # (B, d_inner), as the scan sees it
        return ((self.A * dt[..., None]).exp(),)  # (B, d_inner, d_state)

    @staticmethod
    def cp_carry(state: SSMState, own: SSMState, transition) -> SSMState:
        return SSMState(own.conv, own.ssm + transition[0] * state.ssm)

    # Sequence parallelism (train/sequence_parallel.py). Mamba-1 has no heads: the d_inner channels are split
    # over the SP ranks instead. The convolution and the scan are per channel, but x_proj reads every
    # channel to make the (dt, B, C) all channels share, so each rank projects its own channels and the
    # partial results are summed over the group (an all-reduce of B x T x (dt_rank + 2 d_state) numbers).
    def sp_head_counts(self) -> dict[str, int]:
        return {"Mamba d_inner channels (expand * d_model)": self.d_inner}

    def sp_forward(self, x: torch.Tensor, sp, docs=None) -> torch.Tensor:
        """This rank's tokens x (B, T/sp, d_model) -> y (B, T/sp, d_model); `docs`: packed documents over the
        whole rows (every rank of the group makes the same all-reduces: it has the same documents)."""
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (B, T/sp, d_inner) each
        u = sp.seq_to_heads(u)  # (B, T, d_inner/sp): whole sequences of our channels
        ch = sp.local(self.d_inner)

        def mix(u):
            u, _ = self.conv1d(u, None, ch)
            # Summed in fp32, so bf16 rounds once, after the sum, as the unsplit projection does.
            partial = F.linear(u.float(), self.x_proj.weight[:, ch].float())
            dt, B, C = sp.all_reduce(partial).to(u.dtype).split([self.dt_rank, self.cfg.d_state, self.cfg.d_state], -1)
            dt = F.linear(dt, self.dt_proj.weight[ch])
            y, _ = selective_scan(
                u.transpose(1, 2), dt.transpose(1, 2), -torch.exp(self.A_log[ch].float()), B.transpose(1, 2),
                C.transpose(1, 2), D=self.D[ch].float(), delta_bias=self.dt_proj.bias[ch].float(), delta_softplus=True,
            )
            return y.transpose(1, 2)

        y = mix(u) if docs is None else per_document(mix, u, docs)
        y = sp.heads_to_seq(y)  # (B, T/sp, d_inner)
        # The gate is token-local, so it is applied after the way back (in fp32, as the scan applies it).
        return self.out_proj((y.float() * F.silu(z.float())).to(y.dtype))

    def step(self, x_t: torch.Tensor, state: SSMState) -> tuple[torch.Tensor, SSMState]:
        """x_t (B, d_model) -> y_t (B, d_model), state after this token."""
        u, z = self.in_proj(x_t).chunk(2, dim=-1)  # (B, d_inner) each
        u, conv_state = self.conv1d.step(u, state.conv)
        dt, B, C, dt_bias = self._scan_inputs(u)
        y, ssm_state = selective_state_update(
            state.ssm, u, dt, self.A, B, C, D=self.D.float(), z=z, dt_bias=dt_bias, dt_softplus=True
        )
        return self.out_proj(y), SSMState(conv_state, ssm_state)
