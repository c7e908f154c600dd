"""Learning-rate schedules as pure functions of the step, so a resumed run needs no scheduler state."""

import math

from train.config import ScheduleConfig


def lr_at(step: int, peak_lr: float, cfg: ScheduleConfig) -> float:
    """LR for optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return peak_lr * (step + 1) / cfg.warmup_steps
    min_lr = peak_lr * cfg.min_lr_ratio
    if cfg.kind == "constant":
        return peak_lr
    if cfg.kind == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))
    # wsd: hold the peak, then decay linearly to min_lr over the last decay_fraction of the run.
    decay_steps = max(1, round(cfg.steps * cfg.decay_fraction))
    decay_start = cfg.steps - decay_steps
    if step < decay_start:
        return peak_lr
    progress = min(1.0, (step - decay_start) / decay_steps)
    return peak_lr + (min_lr - peak_lr) * progress
