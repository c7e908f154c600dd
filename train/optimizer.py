"""AdamW with decoupled weight decay on matrices only: no decay on norms, biases, embeddings,
or parameters a mixer marks with `_no_weight_decay` (SSM decay rates, skip weights); and a switch that
turns one update into a true no-op (a non-finite step, train/trainer.py)."""

import torch
from torch import nn

from train.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # built under ZeRO-3's zero.Init, p itself is flat
        skip = ndim < 2 or id(p) in embeddings or getattr(p, "_no_weight_decay", False)
        (no_decay if skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class AdamW(torch.optim.AdamW):
    """torch's AdamW (not DeepSpeed's: its CPU Adam needs a 2-minute C++ build) whose `step` does nothing
    while `skip_update` is set. Every ZeRO stage ends in this object's `step` on its fp32 partition, so a
    skipped step leaves the weights, both moments and the step count exactly as they were."""

    skip_update = False

    def step(self, closure=None):
        if self.skip_update:
            return None
        return super().step(closure)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> AdamW:
    return AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=False)
