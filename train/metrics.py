"""Metrics of a run: a JSONL file in the run folder, wandb (offline by default), and a progress bar.

Only rank 0 writes. Throughput is tokens/s over the whole job; MFU is reported where the GPU's
peak is known (6 * params FLOPs per token, the usual dense estimate).
"""

import json
import resource
import time
from pathlib import Path

import torch
from tqdm import tqdm

# Dense bf16 peak FLOP/s by device name fragment (vendor datasheets, no sparsity).
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg, *, rank: int, start_step: int, n_params: int, resolved_config: dict):
        self.enabled = rank == 0
        self.n_params = n_params
        self.peak = peak_flops()
        self.last_time = time.perf_counter()
        self.last_step = start_step
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

    def log(self, step: int, tokens_per_step: int, metrics: dict) -> dict:
        """Adds throughput over the steps since the last call, writes everything, returns the record."""
        now = time.perf_counter()
        steps = max(1, step - self.last_step)
        step_time = (now - self.last_time) / steps
        record = {"step": step, **metrics, "step_time_s": step_time,
                  "tokens_per_s": tokens_per_step / step_time, "peak_memory_mb": peak_memory_mb()}
        if self.peak:
            record["mfu"] = 6 * self.n_params * record["tokens_per_s"] / self.peak
        self.last_time, self.last_step = now, step
        if self.enabled:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
            if self.wandb_run is not None:
                self.wandb_run.log(record, step=step)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        return record

    def log_eval(self, step: int, metrics: dict) -> dict:
        """In-training evaluation metrics, as their own record (no throughput: eval time is not training)."""
        record = {"step": step, **metrics}
        if self.enabled:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
            if self.wandb_run is not None:
                self.wandb_run.log(record, step=step)
        return record

    def advance(self) -> None:
        if self.enabled:
            self.bar.update(1)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.jsonl.close()
            if self.wandb_run is not None:
                self.wandb_run.finish()
