"""Helpers for tests that launch real training jobs: paths, free ports, the launch command, run results.

Import it as `from harness import ...` (tests/ is on sys.path through the root conftest).
"""

import json
import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"
# ZeRO-3 keeps parameters below stage3_param_persistence_threshold elements (DeepSpeed's default 1e5, more
# than any tiny model's) whole on every rank: 0 makes it partition every parameter, so tests see real gathers.
ZERO3_PARTITION_ALL = "deepspeed.zero_optimization.stage3_param_persistence_threshold=0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Run:
    proc: subprocess.CompletedProcess
    run_dir: Path

    @property
    def records(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.records if "loss" in r]  # eval records carry no loss

    @property
    def output(self) -> str:
        return self.proc.stdout + self.proc.stderr


def job_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


PRETRAIN = ROOT / "launch" / "pretrain.py"
FAULT_WORKER = ROOT / "tests" / "train" / "fault_worker.py"  # launch/pretrain.py with faults injected


def launch_command(config: Path, overrides: list[str], nproc: int, launcher: str, extra: list[str],
                   entry: Path = PRETRAIN) -> list[str]:
    port = str(free_port())
    script = [str(entry), "--config", str(config)]
    script += [a for o in overrides for a in ("--set", o)] + extra
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
                "--master_port", port, *script]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", port, "--master_addr", "127.0.0.1", *script]
    return [sys.executable, *script]


@contextmanager
def transformers_own_auto_classes(*model_types: str):
    """Within the block, the Auto classes map `model_types` to transformers' own classes again.

    Importing flash-linear-attention (the HGRN2 / MoM tests do) re-registers transformers' 'mamba' and
    'mamba2' Auto entries to fla's classes for the rest of the process.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    saved = []
    for mapping in (CONFIG_MAPPING, MODEL_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING):
        extra = mapping._extra_content
        for key in list(extra):
            name = key if isinstance(key, str) else getattr(key, "model_type", None)
            if name in model_types:
                saved.append((extra, key, extra.pop(key)))
    try:
        yield
    finally:
        for extra, key, value in saved:
            extra[key] = value


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def assert_step_and_prefill_equal_forward(model, ids, split: int) -> None:
    """Token-by-token `step` from the empty state, and a prefill of ids[:, :split] followed by one step and
    a continued forward, both give the full forward's logits (within 1e-5)."""
    import torch

    full = model(ids).logits
    state, steps = model.init_state(ids.shape[0]), []
    for t in range(ids.shape[1]):
        logits, state = model.step(ids[:, t], state)
        steps.append(logits)
    assert rel_err(torch.stack(steps, 1), full) < 1e-5
    first = model(ids[:, :split], return_state=True)
    logits, state = model.step(ids[:, split], first.state)
    rest = model(ids[:, split + 1:], state=state)
    assert rel_err(torch.cat([first.logits, logits[:, None], rest.logits], 1), full) < 1e-5
