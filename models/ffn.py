"""SwiGLU feed-forward network (Llama, xLSTM-7B)."""

import torch
import torch.nn.functional as F
from torch import nn

from models.flops import linear


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def flops_per_token(self) -> int:
        return 3 * linear(self.gate.in_features, self.gate.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))
