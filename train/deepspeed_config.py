"""Builds DeepSpeed's config dict from ours; `deepspeed:` in the run config overrides any derived key."""

from typing import Any

from train.config import RunConfig


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg: RunConfig, dp_size: int) -> dict[str, Any]:
    micro = cfg.data.micro_batch_size
    accum = cfg.data.grad_accum_steps(dp_size)
    derived = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * dp_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        # Every rank that holds a share of the same sequences, Ulysses or context parallel: DeepSpeed reduces
        # gradients over data x this.
        "sequence_parallel_size": cfg.parallel.sequence_parallel_size * cfg.parallel.context_parallel_size,
        "bf16": {"enabled": cfg.parallel.precision == "bf16"},
        # Our AdamW is torch's; DeepSpeed only vouches for its own optimizers under ZeRO.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    return _deep_merge(derived, cfg.deepspeed)
