"""The residual block shared by every family: x + mixer(norm(x)), then x + ffn(norm(x)) where there is one."""

import torch
from torch import nn

from models.config import ModelConfig
from models.documents import Documents, per_document
from models.ffn import SwiGLU
from models.norms import RMSNorm
from models.registry import build_mixer


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, mixer: str):
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = build_mixer(mixer, cfg, layer_idx)
        hidden = cfg.ffn_hidden_size
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if hidden else None
        self.ffn = SwiGLU(cfg.d_model, hidden) if hidden else None

    def flops_per_token(self, seq_len: int) -> float:
        return self.mixer.flops_per_token(seq_len) + (self.ffn.flops_per_token() if self.ffn is not None else 0)

    def forward(self, x: torch.Tensor, state=None, docs: Documents | None = None):
        if docs is None:
            h, state = self.mixer(self.mixer_norm(x), state)
        else:  # packed documents, each on a fresh state: no token sees another document
            h, state = self._mix_packed(self.mixer_norm(x), docs), None
        x = x + h
        if self.ffn is not None:
            x = x + self.ffn(self.ffn_norm(x))
        return x, state

    def _mix_packed(self, x: torch.Tensor, docs: Documents) -> torch.Tensor:
        # A mixer with a varlen kernel keeps the documents apart itself (attention: flash-attn's varlen;
        # Mamba-2: seq_idx; mLSTM, HGRN2, Gated DeltaNet: cu_seqlens); every other runs on each document alone
        # (models/documents.py), through its usual kernels.
        if hasattr(self.mixer, "forward_packed"):
            return self.mixer.forward_packed(x, docs)
        y = per_document(lambda xs: self.mixer(xs)[0], x, docs)
        if hasattr(self.mixer, "aux_loss_of"):  # a loss over the batch's tokens: the real ones, not padding
            self.mixer.aux_loss = self.mixer.aux_loss_of(x)
        return y

    def step(self, x_t: torch.Tensor, state):
        h, state = self.mixer.step(self.mixer_norm(x_t), state)
        x_t = x_t + h
        if self.ffn is not None:
            x_t = x_t + self.ffn(self.ffn_norm(x_t))
        return x_t, state
