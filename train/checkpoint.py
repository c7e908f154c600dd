"""Checkpoint save, resume and retention.

Layout: <checkpoint_dir>/step_00000020/ holds DeepSpeed's files (model, optimizer, ZeRO shards), one
RNG file per rank, the model config and `trainer_state.json` (step, tokens seen, data position).
A checkpoint counts as complete only once the COMPLETE marker exists; it is written last, after every
rank has finished writing, so a run killed at any moment resumes from the newest complete one.
"""

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
MODEL_CONFIG = "model_config.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed; the message names it and the fix."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    with open(tmp) as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / MARKER).is_file())


def resolve_resume(resume: str | None, root: Path) -> Path | None:
    """`auto`: newest complete checkpoint under root, or None to start fresh; a path: that checkpoint."""
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no {MARKER} marker: missing or interrupted while saving); "
            f"use --resume auto to take the newest complete one under {root}"
        )
    return path


def check_model_config(path: Path, model_config: dict) -> None:
    """Refuses a checkpoint written for a different model shape, naming the keys that differ."""
    saved = json.loads((path / MODEL_CONFIG).read_text())
    diff = {k: (saved.get(k), model_config.get(k)) for k in saved.keys() | model_config.keys()
            if saved.get(k) != model_config.get(k)}
    if diff:
        details = ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in sorted(diff.items()))
        raise CheckpointError(
            f"checkpoint {path} was written for a different model ({details}); "
            "resume with the config it was trained with, or start a new run_dir"
        )


def save(engine, root: Path, step: int, trainer_state: dict, model_config: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    rank = dist.get_rank()
    tag = tag_for(step)
    path = root / tag
    if rank == 0 and path.exists():  # left by a run killed while saving this very step
        shutil.rmtree(path)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    torch.save({"torch": torch.get_rng_state()}, path / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        _write_atomic(path / MODEL_CONFIG, json.dumps(model_config, indent=1, sort_keys=True))
        _write_atomic(path / TRAINER_STATE, json.dumps(trainer_state, indent=1))
        _write_atomic(path / MARKER, "")
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def load(engine, path: Path) -> dict:
    """Collective: restores model, optimizer and this rank's RNG; returns the trainer state."""
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint files in {path}; delete it or pick another")
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: fresh RNG is fine then
        torch.set_rng_state(torch.load(rng_file, weights_only=True)["torch"])
    return json.loads((path / TRAINER_STATE).read_text())
