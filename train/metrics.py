"""Metrics of a run: a JSONL file in the run folder, wandb (offline by default), and a progress bar.

Only rank 0 writes. Throughput is tokens/s over the whole job. `model_flops_per_token` is the model's
training FLOPs per token at each step's sequence length (models/flops.py: matmul work, forward and
backward); MFU is the job's model FLOP/s divided by the number of GPUs times one GPU's dense bf16 peak
(whatever the run's precision), where that peak is known (GPU_PEAK_FLOPS), else it is not reported, and the
log says so once.
"""

import json
import logging
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s of one GPU by device-name fragment, first match wins (vendor datasheets, no sparsity).
GPU_PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                  ("B200", 2250e12), ("A100", 312e12)]  # "H200" also names the GH200


def peak_flops(device_name: str | None) -> float | None:
    """One GPU's dense bf16 peak for a device name such as 'NVIDIA H100 80GB HBM3'; None when unknown."""
    return next((v for k, v in GPU_PEAK_FLOPS if device_name and k in device_name), None)


def device_peak() -> float | None:
    """This process's GPU's peak, saying once why there is none (no GPU, or one not in the table)."""
    if not torch.cuda.is_available():
        log.info("MFU is not reported: no GPU (it needs a GPU whose bf16 peak is known)")
        return None
    name = torch.cuda.get_device_name()
    peak = peak_flops(name)
    if peak is None:
        log.info("MFU is not reported: no bf16 peak known for %r (train/metrics.py GPU_PEAK_FLOPS)", name)
    return peak


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg, *, rank: int, world_size: int, start_step: int,
                 flops_per_token: Callable[[int], float], resolved_config: dict, peak: float | None = None):
        """flops_per_token(seq_len): the model's training FLOPs per token; peak: one GPU's (device_peak())."""
        self.enabled = rank == 0
        self.world_size, self.flops_per_token, self.peak = world_size, flops_per_token, peak
        self.last_time = time.perf_counter()
        self.last_step = start_step
        self.tokens, self.flops = 0, 0.0  # since the last record
        self.wandb_run = None
        if not self.enabled:
            return
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        self.bar = tqdm(
            total=cfg.schedule.steps, initial=start_step, desc="train", unit="step",
            disable=not cfg.logging.progress_bar, dynamic_ncols=True,
        )
        if cfg.logging.wandb != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                project=cfg.logging.wandb_project, dir=str(run_dir), mode=cfg.logging.wandb,
                config=resolved_config, name=run_dir.name, resume="allow",
            )

    def log(self, step: int, metrics: dict) -> dict:
        """Adds throughput over the steps since the last call, writes everything, returns the record."""
        now = time.perf_counter()
        elapsed = now - self.last_time
        record = {"step": step, **metrics, "step_time_s": elapsed / max(1, step - self.last_step),
                  "tokens_per_s": self.tokens / elapsed, "peak_memory_mb": peak_memory_mb(),
                  "model_flops_per_token": self.flops / max(1, self.tokens)}
        if self.peak:
            record["mfu"] = self.flops / elapsed / (self.world_size * self.peak)
        self.last_time, self.last_step, self.tokens, self.flops = now, step, 0, 0.0
        if self.enabled:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
            if self.wandb_run is not None:
                self.wandb_run.log(record, step=step)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        return record

    def log_other(self, step: int, metrics: dict) -> dict:
        """A record without throughput: in-training evaluation, a skipped step."""
        record = {"step": step, **metrics}
        if self.enabled:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
            if self.wandb_run is not None:
                self.wandb_run.log(record, step=step)
        return record

    def advance(self, tokens: int, seq_len: int) -> None:
        """One optimizer step of `tokens` tokens (the whole job's) at sequence length `seq_len`."""
        self.tokens += tokens
        self.flops += tokens * self.flops_per_token(seq_len)
        if self.enabled:
            self.bar.update(1)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.jsonl.close()
            if self.wandb_run is not None:
                self.wandb_run.finish()
