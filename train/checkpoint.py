"""Checkpoint save, verification, resume and retention.

Layout: <checkpoint_dir>/step_00000020/ holds DeepSpeed's files (model, optimizer, ZeRO shards), one RNG
file per rank (CPU and, where present, CUDA generators), the model config, `trainer_state.json` (step,
tokens seen, data position), `MANIFEST.json` (every file's size and crc32) and, last, the `COMPLETE`
marker. Resuming on another number of data-parallel ranks adds <step>/universal/ (see `_universal`).

Writing. Every file goes through `Recorder`: DeepSpeed's writes through its checkpoint engine, ours
through `Recorder.write`; the crc32 is computed while the bytes are written (no second read: zlib's
crc32 runs at several GB/s). A write that fails (no space, no permission, quota) is recorded, not raised,
so no rank leaves DeepSpeed's collectives early; afterwards every rank learns of it, the partial folder
is removed, and the run stops with CheckpointWriteError (exit code 74, EX_IOERR) naming the folder, the
OS error and the free space. COMPLETE is written only once every file is listed in MANIFEST.json.

Verifying. Before a resume every listed file must exist with its size (a stat) and its crc32 (one read of
each file, split over the ranks; zlib's crc32 runs at 4-7 GB/s, so the storage's read speed sets the
time: xLSTM-7B under ZeRO-3 on 8 ranks reads ~100 GB in all). `--resume auto` reports a damaged newest checkpoint (which file, what is wrong), moves it
to damaged_step_N, and takes the previous complete one; an explicit `--resume PATH` that is damaged is an
error.

Retention. Complete checkpoints beyond `checkpoint.keep_last` are deleted only after the new one is
complete and its files have the sizes its manifest lists; a complete checkpoint is never rewritten (a run
refuses to start over complete checkpoints newer than the one it resumes from).
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
MANIFEST = "MANIFEST.json"
TRAINER_STATE = "trainer_state.json"
MODEL_CONFIG = "model_config.json"
UNIVERSAL = "universal"  # <step>/universal/: that step in DeepSpeed's universal format (see `_universal`)
DAMAGED_PREFIX = "damaged_"  # --resume auto moves a damaged checkpoint step_N to damaged_step_N
CHECKPOINT_FAILED_EXIT_CODE = 74  # EX_IOERR from sysexits.h: "an error occurred while doing I/O on some file"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed; the message names it and the fix."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; earlier complete checkpoints are intact."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / MARKER).is_file())


# ---------------------------------------------------------------------------------------------------
# Writing: checksums while writing, failures recorded
# ---------------------------------------------------------------------------------------------------


class _ChecksumWriter:
    """A write-only file object that keeps the size and crc32 of what passes through, and the first OSError
    (torch.save's zip writer turns it into an opaque RuntimeError)."""

    def __init__(self, file):
        self.file, self.size, self.crc, self.error = file, 0, 0, None

    def write(self, data) -> int:
        try:
            written = self.file.write(data)
        except OSError as e:
            self.error = self.error or e
            raise
        self.size += len(data)
        self.crc = zlib.crc32(data, self.crc)
        return written

    def flush(self) -> None:
        self.file.flush()


def _open_for_write(path: Path):
    return open(path, "wb")


class Recorder:
    """Writes the files of one checkpoint folder, recording each file's size and crc32, and the failures."""

    def __init__(self):
        self.files: dict[str, dict] = {}
        self.errors: list[str] = []

    def write(self, path: Path, obj=None, text: str | None = None, zipfile: bool = True) -> bool:
        """torch.save(obj) or the text to `path`, fsync'd; False (and the error recorded) when it fails."""
        writer = None
        try:
            with _open_for_write(path) as f:
                writer = _ChecksumWriter(f)
                if text is not None:
                    writer.write(text.encode())
                else:
                    torch.save(obj, writer, _use_new_zipfile_serialization=zipfile)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as e:
            cause = writer.error if writer is not None and writer.error is not None else e
            self.errors.append(f"writing {path}: {cause}")
            return False
        self.files[path.name] = {"bytes": writer.size, "crc32": f"{writer.crc:08x}"}
        return True

    def install(self, engine) -> None:
        """Route DeepSpeed's own checkpoint writes through this recorder."""
        engine.checkpoint_engine = _RecordingEngine(engine.checkpoint_engine, self)
        copy_scripts = engine._copy_recovery_script  # zero_to_fp32.py beside the shards: a copy, not a save

        def guarded_copy(save_path):
            try:
                copy_scripts(save_path)
            except OSError as e:
                self.errors.append(f"copying DeepSpeed's recovery scripts to {save_path}: {e}")

        engine._copy_recovery_script = guarded_copy


class _RecordingEngine:
    """DeepSpeed's checkpoint engine with `save` going through a Recorder; everything else is the engine's."""

    def __init__(self, inner, recorder: Recorder):
        self._inner, self._recorder = inner, recorder

    def save(self, state_dict, path: str):
        self._recorder.write(Path(path), state_dict, zipfile=getattr(self._inner, "zipfile_serialization", True))

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _free_space(path: Path) -> str:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return f"{shutil.disk_usage(path).free / 2**20:,.1f} MiB free on {path}"
    except OSError:
        return "free space unknown"


def _stop(path: Path, errors: list[str]) -> None:
    """Collective: every rank raises CheckpointWriteError after rank 0 removed the partial folder."""
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    message = (f"checkpoint {path} could not be written: {errors[0]}{more}; {_free_space(path)}. The partial "
               f"folder was removed; earlier complete checkpoints are intact. Free space or fix the permissions "
               f"of {path.parent} (or set checkpoint.dir), then resume with --resume auto")
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)  # no folder that looks like a checkpoint stays behind
    dist.barrier()
    raise CheckpointWriteError(message)


def _write_probe(path: Path) -> None:
    path.write_bytes(b"")
    path.unlink()


def check_writable(root: Path, first_files: dict[Path, str] | None = None) -> None:
    """Collective, before the first step: rank 0 writes `first_files` (the run's resolved config) and checks
    that the checkpoint folder can be created and written to, so a run does not learn it only at its first
    checkpoint; every rank gets the verdict."""
    error = [None]
    if dist.get_rank() == 0:
        try:
            for path, text in (first_files or {}).items():
                path.write_text(text)
            root.mkdir(parents=True, exist_ok=True)
            _write_probe(root / f".write_probe_{os.getpid()}")
        except OSError as e:
            error[0] = str(e)
    dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise CheckpointWriteError(f"checkpoint folder {root} or the run folder is not writable ({error[0]}; "
                                   f"{_free_space(root)}); fix the permissions or free space, or set checkpoint.dir")


def rng_state() -> dict:
    """The CPU generator and, on a GPU, this rank's device's (each rank owns one device; the others' are not
    its to restore, and a resume may see fewer of them)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, recorder: Recorder, root: Path, step: int, trainer_state: dict, model_config: dict,
         keep_last: int) -> Path:
    """Collective: every rank calls it (`recorder` installed on the engine). Returns the checkpoint folder."""
    rank = dist.get_rank()
    path = root / tag_for(step)
    if (path / MARKER).is_file():  # only the one resumed from (resolve_resume refuses newer ones): unchanged
        dist.barrier()
        return path
    failed = [False]
    if rank == 0:
        try:
            if path.exists():  # left by a run killed while saving this very step
                shutil.rmtree(path)
            path.mkdir(parents=True)
        except OSError as e:
            recorder.errors.append(f"creating {path}: {e}")
            failed[0] = True
    dist.broadcast_object_list(failed, src=0)
    if failed[0]:
        _stop(path, recorder.errors or [f"creating {path} failed on rank 0"])
    recorder.files, recorder.errors = {}, []
    engine.save_checkpoint(str(root), tag=path.name, save_latest=False)
    recorder.write(path / f"rng_rank{rank}.pt", rng_state())
    records = [None] * dist.get_world_size()
    dist.all_gather_object(records, (recorder.files, recorder.errors))
    errors = [e for _, errs in records for e in errs]
    if errors:
        _stop(path, errors)
    outcome = [None]
    if rank == 0:
        files = {name: entry for files, _ in records for name, entry in files.items()}
        recorder.files, recorder.errors = files, []
        recorder.write(path / MODEL_CONFIG, text=json.dumps(model_config, indent=1, sort_keys=True))
        recorder.write(path / TRAINER_STATE, text=json.dumps(trainer_state, indent=1))
        try:
            for extra in sorted(p for p in path.iterdir() if p.is_file() and p.name not in recorder.files):
                recorder.files[extra.name] = _describe(extra)  # files DeepSpeed wrote beside its engine's
        except OSError as e:
            recorder.errors.append(f"reading back {path}: {e}")
        if not recorder.errors:
            recorder.write(path / MANIFEST, text=json.dumps({"files": recorder.files}, indent=1, sort_keys=True))
        if not recorder.errors:
            recorder.write(path / MARKER, text="")
        outcome[0] = recorder.errors
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0]:
        _stop(path, outcome[0])
    if rank == 0:
        _retain(root, path, keep_last)
    dist.barrier()
    return path


def _retain(root: Path, newest: Path, keep_last: int) -> None:
    """Deletes complete checkpoints older than the newest keep_last, once `newest` has the files and sizes its
    manifest lists; never `newest` itself."""
    problems = verify(newest, hashes=False)
    if problems:  # the new checkpoint does not read back as written: keep everything
        log.warning("checkpoint %s does not match its manifest (%s); no older checkpoint is deleted",
                    newest, problems[0])
        return
    older = [p for p in complete_checkpoints(root) if p.name < newest.name]
    for old in older[:len(older) - (keep_last - 1)]:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Verifying
# ---------------------------------------------------------------------------------------------------


def _describe(path: Path) -> dict:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return {"bytes": path.stat().st_size, "crc32": f"{crc:08x}"}


def verify(path: Path, rank: int = 0, world: int = 1, hashes: bool = True) -> list[str]:
    """Problems with this rank's share (every world-th file) of a checkpoint's files; [] when intact."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        if (path / MARKER).is_file() and (path / TRAINER_STATE).is_file():
            log.warning("checkpoint %s predates file manifests: its files cannot be verified", path)
            return []
        return [f"{manifest} is missing"]
    try:
        files = json.loads(manifest.read_text())["files"]
        entries = sorted((str(name), int(e["bytes"]), str(e["crc32"])) for name, e in files.items())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return [f"{manifest} is unreadable ({type(e).__name__}: {e})"]
    problems = []
    for name, size, crc in entries[rank::world]:
        file = path / name
        try:
            if not file.is_file():
                problems.append(f"{file} is missing")
            elif file.stat().st_size != size:
                problems.append(f"{file} has {file.stat().st_size:,} bytes, its manifest says {size:,} (truncated "
                                "or replaced)")
            elif hashes and (actual := _describe(file)["crc32"]) != crc:
                problems.append(f"{file} has crc32 {actual}, its manifest says {crc} (damaged)")
        except OSError as e:  # an unreadable file is a damaged one, on whichever rank reads it
            problems.append(f"{file} cannot be read ({e})")
    return problems


def verify_collective(path: Path) -> list[str]:
    """Every rank checks its share of the files; all ranks get every problem."""
    if not dist.is_initialized():
        return verify(path)
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, verify(path, dist.get_rank(), dist.get_world_size()))
    return [p for share in shares for p in share]


def _names(paths: list[Path]) -> str:
    return ", ".join(p.name for p in paths)


def resolve_resume(resume: str | None, root: Path) -> Path | None:
    """Collective (after the process group is up). `auto`: the newest complete checkpoint under root that is
    intact (damaged newer ones are moved aside), or None when there is none; a path: that checkpoint, which
    must be complete and intact. Complete checkpoints newer than the one resumed from (or any, without
    --resume) are refused: the run would write over them, or keep_last would delete its own."""
    found = complete_checkpoints(root)
    if resume is None:
        if found:
            raise CheckpointError(f"{root} already holds complete checkpoints ({_names(found)}); continue them with "
                                  "--resume auto, or give this run its own run_dir (or checkpoint.dir)")
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / MARKER).is_file():
            raise CheckpointError(
                f"{path} is not a complete checkpoint (no {MARKER} marker: missing or interrupted while saving); "
                f"use --resume auto to take the newest complete one under {root}"
            )
        problems = verify_collective(path)
        if problems:
            raise CheckpointError(f"checkpoint {path} is damaged: {'; '.join(problems)}. Resume from another one "
                                  f"(--resume auto takes the newest intact one under {root})")
        newer = [p for p in found if p.name > path.name]
        if newer:
            raise CheckpointError(f"{root} holds checkpoints newer than {path.name} ({_names(newer)}) that this run "
                                  "would write over: move them away first, or resume the newest with --resume auto")
        return path
    damaged = []
    for path in reversed(found):
        problems = verify_collective(path)
        if not problems:
            _move_aside(damaged)
            return path
        damaged.append((path, problems))
    if found:
        details = "; ".join(f"{path.name}: {'; '.join(problems)}" for path, problems in damaged)
        raise CheckpointError(f"every complete checkpoint under {root} is damaged ({details}); nothing was moved. "
                              f"Restore one, or move {root} away to start afresh")
    return None


def _move_aside(damaged: list[tuple[Path, list[str]]]) -> None:
    """Collective: rank 0 renames each damaged checkpoint step_N (newer than the one resumed from) to
    damaged_step_N: out of the way of the run, which writes step N again, and of keep_last; kept for a look."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    error = [None]
    if rank == 0:
        for path, problems in damaged:
            aside = path.with_name(DAMAGED_PREFIX + path.name)
            log.warning("checkpoint %s is damaged (%s): moved to %s", path, "; ".join(problems), aside.name)
            try:
                shutil.rmtree(aside, ignore_errors=True)  # an older damaged copy of the same step
                os.replace(path, aside)
            except OSError as e:
                error[0] = f"checkpoint {path} is damaged ({'; '.join(problems)}) and cannot be moved aside ({e}); " \
                           "move or delete it, then resume again"
                break
    if dist.is_initialized():
        dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise CheckpointError(error[0])


def check_model_config(path: Path, model_config: dict) -> None:
    """Refuses a checkpoint written for a different model shape, naming the keys that differ."""
    from models import ModelConfig

    # Through today's schema: sections added since the checkpoint was written take their defaults on both
    # sides instead of reading as a different model.
    try:
        saved = ModelConfig(**json.loads((path / MODEL_CONFIG).read_text())).model_dump(mode="json")
    except (ValueError, TypeError, OSError) as e:
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


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


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
        log.info("%s was written by %d data-parallel ranks; converting it to %s", path, shards, out)
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
    try:
        if universal is None:
            load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True)
        else:
            # DeepSpeed reads this flag only while loading; setting it here equals configuring it.
            configured, engine._config.load_universal_checkpoint = engine._config.load_universal_checkpoint, True
            try:
                load_path, _ = engine.load_checkpoint(str(path), tag=universal.name, load_module_strict=True)
            finally:
                engine._config.load_universal_checkpoint = configured
    except (RuntimeError, OSError, EOFError, ValueError) as e:  # a checkpoint without a manifest to verify
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:300]}); "
                              "resume from an earlier one") from None
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint files in {path}; delete it or pick another")
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: fresh RNG is fine then
        restore_rng(torch.load(rng_file, weights_only=True))
    try:
        return json.loads((path / TRAINER_STATE).read_text())
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path / TRAINER_STATE} is unreadable ({e}); resume from an earlier checkpoint") from None


def consolidated_state_dict(path: Path) -> tuple[dict, dict]:
    """(model config dict, full fp32 state dict) of a complete, intact checkpoint, in one process, without
    DeepSpeed engines: ZeRO partitions are merged by DeepSpeed's zero_to_fp32; ZeRO-0 holds the whole model."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MARKER} marker); pick a step_* folder "
                              "that has one")
    problems = verify(path)
    if problems:
        raise CheckpointError(f"checkpoint {path} is damaged: {'; '.join(problems)}; pick another step_* folder")
    try:
        model_config = json.loads((path / MODEL_CONFIG).read_text())
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path / MODEL_CONFIG} is unreadable ({e}); pick another step_* folder") from None
    if any(path.glob("zero_pp_rank_*_optim_states.pt")) or any(path.glob("*zero_pp_rank_*_model_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    else:
        # Our own checkpoint (DeepSpeed pickles its config beside the weights, so weights_only cannot be used).
        state = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return model_config, {k: v.float() for k, v in state.items()}

