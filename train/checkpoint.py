"""Checkpoint save, resume and retention.

Layout: <checkpoint_dir>/step_00000020/ holds DeepSpeed's files (model, optimizer, ZeRO shards), one
RNG file per rank, the model config and `trainer_state.json` (step, tokens seen, data position).
A checkpoint counts as complete only once the COMPLETE marker exists; it is written last, after every
rank has finished writing, so a run killed at any moment resumes from the newest complete one.
Resuming on another number of data-parallel ranks adds <step>/universal/ (see `_universal`).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
MODEL_CONFIG = "model_config.json"
UNIVERSAL = "universal"  # <step>/universal/: that step in DeepSpeed's universal format (see `_universal`)


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
    from models import ModelConfig

    # Through today's schema: sections added since the checkpoint was written take their defaults on both
    # sides instead of reading as a different model.
    try:
        saved = ModelConfig(**json.loads((path / MODEL_CONFIG).read_text())).model_dump(mode="json")
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path} has a model config this code cannot read: {e}") from None
    model_config = ModelConfig(**model_config).model_dump(mode="json")
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


def _universal(engine, path: Path) -> Path | None:
    """Collective. ZeRO shards the optimizer state by data-parallel rank, and DeepSpeed refuses a checkpoint
    written by another number of ranks; its universal format has no such tie. Returns <path>/universal
    (converted once by rank 0 with DeepSpeed's ds_to_universal) when the dp size changed or the DeepSpeed
    config asks for universal loading (checkpoint.load_universal), else None."""
    shards = len(list(path.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt")))
    if not engine.load_universal_checkpoint() and shards in (0, engine.seq_dp_world_size):
        return None
    out, error = path / UNIVERSAL, None
    if dist.get_rank() == 0 and not out.is_dir():
        print(f"{path} was written by {shards} data-parallel ranks; converting it to {out}", flush=True)
        tmp = out.with_name(UNIVERSAL + ".tmp")  # renamed when done: a killed conversion is redone
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
               "--output_folder", str(tmp), "--inject_missing_state"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            os.replace(tmp, out)
        else:
            error = f"converting {path} to a universal checkpoint failed:\n{(proc.stdout + proc.stderr)[-3000:]}"
    shared = [error]
    dist.broadcast_object_list(shared, src=0)  # every rank raises, none waits at a barrier for rank 0
    if shared[0]:
        raise CheckpointError(shared[0])
    return out


def load(engine, path: Path) -> dict:
    """Collective: restores model, optimizer and this rank's RNG; returns the trainer state."""
    universal = _universal(engine, path)
    if universal is None:
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True)
    else:
        # DeepSpeed reads this flag only while loading; setting it here equals configuring it.
        configured, engine._config.load_universal_checkpoint = engine._config.load_universal_checkpoint, True
        try:
            load_path, _ = engine.load_checkpoint(str(path), tag=universal.name, load_module_strict=True)
        finally:
            engine._config.load_universal_checkpoint = configured
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint files in {path}; delete it or pick another")
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: fresh RNG is fine then
        torch.set_rng_state(torch.load(rng_file, weights_only=True)["torch"])
    return json.loads((path / TRAINER_STATE).read_text())


def consolidated_state_dict(path: Path) -> tuple[dict, dict]:
    """(model config dict, full fp32 state dict) of a complete checkpoint, in one process, without DeepSpeed
    engines: ZeRO partitions are merged by DeepSpeed's zero_to_fp32; ZeRO-0 holds the whole model already."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MARKER} marker); pick a step_* folder "
                              "that has one")
    model_config = json.loads((path / MODEL_CONFIG).read_text())
    if any(path.glob("zero_pp_rank_*_optim_states.pt")) or any(path.glob("*zero_pp_rank_*_model_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    else:
        # Our own checkpoint (DeepSpeed pickles its config beside the weights, so weights_only cannot be used).
        state = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return model_config, {k: v.float() for k, v in state.items()}
