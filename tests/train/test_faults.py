"""The fault battery (README "Failures"): every runtime fault ends in a non-zero exit with a message naming the
file and the fix, or in a documented recovery; never a traceback; no intact complete checkpoint is lost.
Also: a non-finite step is a true no-op under every ZeRO stage, `keep_last`, and the CUDA RNG state."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from harness import FAULT_WORKER, ROOT, TINY, ZERO3_PARTITION_ALL, Run, job_env, launch_command

from train import checkpoint
from train.checkpoint import CHECKPOINT_FAILED_EXIT_CODE, complete_checkpoints, verify

pytestmark = pytest.mark.slow

SHORT = ["schedule.warmup_steps=1", "checkpoint.every=2", "checkpoint.keep_last=5", "logging.every=1"]


def base_command(run_dir: Path, shards: Path, *overrides: str, entry: Path = FAULT_WORKER) -> list[str]:
    base = [f"run_dir={run_dir}", f"data.shards_dir={shards}", "logging.progress_bar=false", "logging.wandb=disabled"]
    return launch_command(TINY / "transformer.yaml", base + list(overrides), 1, "python", [], entry)


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, stdlib_shards) -> Path:
    """A finished 1-rank run of the tiny Transformer with complete checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("checkpointed") / "run"
    proc = subprocess.run(base_command(run_dir, stdlib_shards, "schedule.steps=4", *SHORT), env=job_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")] == ["step_00000002", "step_00000004"]
    return run_dir


@pytest.fixture
def run_copy(checkpointed, tmp_path) -> Path:
    return Path(shutil.copytree(checkpointed, tmp_path / "run"))


@pytest.fixture
def shards_copy(stdlib_shards, tmp_path) -> Path:
    return Path(shutil.copytree(stdlib_shards, tmp_path / "shards"))


def intact(run_dir: Path) -> set[str]:
    return {p.name for p in complete_checkpoints(run_dir / "checkpoints") if not verify(p)}


def clean_failure(run: Run, code: int, *named: str) -> None:
    assert run.proc.returncode == code, run.output[-3000:]
    assert "Traceback" not in run.output, run.output[-3000:]
    for text in named:
        assert text in run.output, (text, run.output[-3000:])


def step_file(run_dir: Path, step: int, name: str) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}" / name


# ---------------------------------------------------------------------------------------------------
# Damaged checkpoints: --resume auto reports them and resumes from the previous complete one
# ---------------------------------------------------------------------------------------------------

def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def flip_bytes(path: Path) -> None:
    with open(path, "r+b") as f:  # same size: only the checksum can tell
        f.seek(path.stat().st_size // 2)
        f.write(b"\xde\xad\xbe\xef")


DAMAGES = {  # name -> (file of step_4, damage, what the report says)
    "truncated-model-states": ("mp_rank_00_model_states.pt", truncate, "truncated or replaced"),
    "flipped-optimizer-bytes": ("zero_pp_rank_0_mp_rank_00_optim_states.pt", flip_bytes, "(damaged)"),
    "missing-rng-file": ("rng_rank0.pt", Path.unlink, "is missing"),
    "garbage-trainer-state": ("trainer_state.json", lambda p: p.write_text("{not json"), "truncated or replaced"),
    "garbage-manifest": ("MANIFEST.json", lambda p: p.write_bytes(b"\xff\xfe garbage"), "is unreadable"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_one_resumes(damage, train, run_copy):
    name, damage_fn, said = DAMAGES[damage]
    damage_fn(step_file(run_copy, 4, name))
    run = train(TINY / "transformer.yaml", "schedule.steps=6", *SHORT, launcher="python", run_dir=run_copy,
                extra=["--resume", "auto"])
    clean_failure(run, 0, f"step_00000004/{name}", said, "moved to damaged_step_00000004",
                  "resuming from " + str(run_copy / "checkpoints" / "step_00000002"))
    assert (run_copy / "checkpoints" / "damaged_step_00000004" / name).exists() or name == "rng_rank0.pt"
    assert {"step_00000002", "step_00000004", "step_00000006"} <= intact(run_copy)  # step 4 written again
    assert [r["step"] for r in run.records if "loss" in r][4:] == [3, 4, 5, 6]  # after the first run's 1..4


def test_an_explicit_damaged_checkpoint_is_a_clear_error(train, run_copy):
    truncate(step_file(run_copy, 4, "mp_rank_00_model_states.pt"))
    path = run_copy / "checkpoints" / "step_00000004"
    run = train(TINY / "transformer.yaml", "schedule.steps=6", *SHORT, launcher="python", run_dir=run_copy,
                extra=["--resume", str(path)], check=False)
    clean_failure(run, 1, f"checkpoint {path} is damaged", "mp_rank_00_model_states.pt", "--resume auto")
    assert intact(run_copy) == {"step_00000002"}


def test_when_every_checkpoint_is_damaged_the_run_stops_instead_of_starting_afresh(train, run_copy):
    for step in (2, 4):
        flip_bytes(step_file(run_copy, step, "mp_rank_00_model_states.pt"))
    run = train(TINY / "transformer.yaml", "schedule.steps=6", *SHORT, launcher="python", run_dir=run_copy,
                extra=["--resume", "auto"], check=False)
    clean_failure(run, 1, "every complete checkpoint under", "is damaged", "nothing was moved", "to start afresh")
    assert [p.name for p in complete_checkpoints(run_copy / "checkpoints")] == ["step_00000002", "step_00000004"]
    again = train(TINY / "transformer.yaml", "schedule.steps=6", *SHORT, launcher="python", run_dir=run_copy,
                  extra=["--resume", "auto"], check=False)
    clean_failure(again, 1, "every complete checkpoint under")  # and not a silent fresh start on the retry


def test_a_run_would_not_write_over_complete_checkpoints(train, run_copy):
    fresh = train(TINY / "transformer.yaml", "schedule.steps=6", *SHORT, launcher="python", run_dir=run_copy,
                  check=False)
    clean_failure(fresh, 1, "already holds complete checkpoints (step_00000002, step_00000004)", "--resume auto")
    older = train(TINY / "transformer.yaml", "schedule.steps=6", *SHORT, launcher="python", run_dir=run_copy,
                  extra=["--resume", str(run_copy / "checkpoints" / "step_00000002")], check=False)
    clean_failure(older, 1, "newer than step_00000002 (step_00000004)", "move them away")
    assert intact(run_copy) == {"step_00000002", "step_00000004"}


# ---------------------------------------------------------------------------------------------------
# Write failures while checkpointing: exit 74, the folder, the OS error and the free space; nothing lost
# ---------------------------------------------------------------------------------------------------

WRITE_FAULTS = {"no-space": ("ENOSPC", "No space left on device"), "quota": ("EDQUOT", "Disk quota exceeded"),
                "permission": ("EACCES", "Permission denied")}


@pytest.mark.parametrize("fault", list(WRITE_FAULTS))
def test_a_failed_checkpoint_write_stops_the_run_and_keeps_the_earlier_ones(fault, train, run_copy):
    code, said = WRITE_FAULTS[fault]
    run = train(TINY / "transformer.yaml", "schedule.steps=8", *SHORT, launcher="python", run_dir=run_copy,
                extra=["--resume", "auto"], check=False, entry=FAULT_WORKER,
                env={"FAULT_WRITE_ERRNO": f"{code}:step_00000006:optim"})
    folder = run_copy / "checkpoints" / "step_00000006"
    clean_failure(run, CHECKPOINT_FAILED_EXIT_CODE, f"checkpoint {folder} could not be written", said, "MiB free",
                  "earlier complete checkpoints are intact")
    assert not folder.exists()  # nothing that looks like a checkpoint
    assert intact(run_copy) == {"step_00000002", "step_00000004"}


def test_an_unwritable_checkpoint_folder_stops_before_the_first_step(train, tmp_path):
    run = train(TINY / "transformer.yaml", "schedule.steps=4", *SHORT, launcher="python", check=False,
                entry=FAULT_WORKER, env={"FAULT_PROBE_ERRNO": "EROFS"})
    clean_failure(run, CHECKPOINT_FAILED_EXIT_CODE, "is not writable", "Read-only file system", "checkpoint.dir")
    assert run.losses == []


def test_a_full_disk_during_a_two_rank_checkpoint(train, tmp_path):
    """A real full disk where this machine lets root mount a tmpfs; both ranks stop with exit 74."""
    disk = tmp_path / "small-disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): the injected ENOSPC test covers the behaviour")
    try:
        run = train(TINY / "transformer.yaml", "schedule.steps=4", *SHORT, f"checkpoint.dir={disk}/checkpoints",
                    check=False)
        clean_failure(run, CHECKPOINT_FAILED_EXIT_CODE, "No space left on device", f"{disk}/checkpoints")
        assert complete_checkpoints(disk / "checkpoints") == [] and not (disk / "checkpoints" / "step_00000002").exists()
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# ---------------------------------------------------------------------------------------------------
# Data and config files that are garbage, truncated or of the wrong type
# ---------------------------------------------------------------------------------------------------

DATA_FAULTS = {  # name -> (damage of the shards folder, what the message says)
    "offsets-garbage": (lambda d: (d / "train_00000.offsets.npy").write_bytes(b"\x93NUMPY garbage"),
                        "train_00000.offsets.npy is not a valid .npy array"),
    "offsets-wrong-type": (lambda d: __import__("numpy").save(d / "train_00000.offsets.npy", [1.5, 2.5]),
                           "train_00000.offsets.npy holds float64"),
    "tokens-truncated": (lambda d: truncate(d / "train_00000.bin"), "train_00000.bin holds"),
    "tokens-flipped": (lambda d: flip_bytes(d / "train_00000.bin"), "train_00000.bin has sha256"),
    "manifest-garbage": (lambda d: (d / "manifest.json").write_bytes(b"\xff\xfe\x00"), "is not a valid manifest"),
    "tokenizer-garbage": (lambda d: (d / "tokenizer.json").write_text("[]"), "differs from the one the shards"),
}


@pytest.mark.parametrize("fault", list(DATA_FAULTS))
def test_a_damaged_data_file_is_a_clear_error(fault, train, shards_copy):
    damage, said = DATA_FAULTS[fault]
    damage(shards_copy)
    run = train(TINY / "transformer.yaml", f"data.shards_dir={shards_copy}", launcher="python", check=False)
    clean_failure(run, 1, said)
    assert "prepare" in run.output


def test_a_config_that_is_not_utf8_or_has_a_negative_seed_is_refused(train, tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes((TINY / "transformer.yaml").read_bytes() + "# caf\xe9\n".encode("latin-1"))
    run = train(latin1, launcher="python", check=False)
    clean_failure(run, 1, f"config file {latin1} is not UTF-8 text", "save it as UTF-8")
    run = train(TINY / "transformer.yaml", "seed=-1", launcher="python", check=False)
    clean_failure(run, 1, "seed: Input should be greater than or equal to 0")


# ---------------------------------------------------------------------------------------------------
# A signal during the first step: checkpoint after it, exit 75, resume
# ---------------------------------------------------------------------------------------------------

def test_sigterm_during_the_first_step_checkpoints_it_and_resumes(train, tmp_path, stdlib_shards):
    run_dir = tmp_path / "run"
    cmd = base_command(run_dir, stdlib_shards, "schedule.steps=4", *SHORT)
    proc = subprocess.Popen(cmd, env=job_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, seen = time.monotonic() + 120, ""
    while "kernels on cpu" not in seen:  # the report comes just before the first step
        assert time.monotonic() < deadline and proc.poll() is None, seen[-3000:]
        seen += proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75 and "preempted at step 1" in rest and "Traceback" not in rest, rest[-3000:]
    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")] == ["step_00000001"]
    resumed = train(TINY / "transformer.yaml", "schedule.steps=4", *SHORT, launcher="python", run_dir=run_dir,
                    extra=["--resume", "auto"])
    assert "resuming from" in resumed.output and resumed.records[-1]["step"] == 4


# ---------------------------------------------------------------------------------------------------
# A non-finite step is a true no-op
# ---------------------------------------------------------------------------------------------------

def fingerprints(path: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in Path(f"{path}.rank{rank}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage", [2, 3])
def test_a_nan_in_one_micro_batch_of_one_rank_is_skipped_as_if_that_batch_never_came(stage, train, tmp_path):
    """NaN in micro batch 1 of rank 1 at step 4: after it every rank's weights and optimizer state (moments,
    step count) are bit for bit those after step 3, and the run then equals one whose batch 4 never came."""
    common = ["parallel.precision=fp32", f"parallel.zero_stage={stage}", "schedule.steps=8", "schedule.warmup_steps=2",
              "logging.every=1", "checkpoint.every=100"] + ([ZERO3_PARTITION_ALL] if stage == 3 else [])
    nan = train(TINY / "transformer.yaml", *common, run_dir=tmp_path / "nan", entry=FAULT_WORKER,
                env={"FAULT_NAN": "3:1:1", "FAULT_FINGERPRINT": str(tmp_path / "nan-fp")})
    dropped = train(TINY / "transformer.yaml", *common, run_dir=tmp_path / "dropped", entry=FAULT_WORKER,
                    env={"FAULT_DROP_BATCH": "3", "FAULT_FINGERPRINT": str(tmp_path / "dropped-fp")})
    for rank in (0, 1):
        got, expected = fingerprints(tmp_path / "nan-fp", rank), fingerprints(tmp_path / "dropped-fp", rank)
        assert [f["finite"] for f in got] == [True] * 3 + [False] + [True] * 5
        assert got[3]["crc32"] == got[2]["crc32"]  # the skipped step changed nothing
        assert [f["crc32"] for f in got[4:]] == [f["crc32"] for f in expected[3:]]
    assert [r["skipped_steps"] for r in nan.records if "loss" not in r] == [1]
    assert "loss is NaN/inf at step 4 (1 in a row): update skipped" in nan.output
    losses = {r["step"]: r["loss"] for r in nan.records if "loss" in r}
    assert sorted(losses) == list(range(1, 9))
    assert losses == pytest.approx({r["step"]: r["loss"] for r in dropped.records}, rel=1e-6, abs=0)


# ---------------------------------------------------------------------------------------------------
# Retention and RNG
# ---------------------------------------------------------------------------------------------------

def test_keep_last_keeps_the_newest_complete_checkpoints(train, tmp_path):
    run = train(TINY / "transformer.yaml", "schedule.steps=8", "schedule.warmup_steps=1", "checkpoint.every=2",
                "checkpoint.keep_last=2", launcher="python")
    assert [p.name for p in complete_checkpoints(run.run_dir / "checkpoints")] == ["step_00000006", "step_00000008"]
    assert all(not verify(p) for p in complete_checkpoints(run.run_dir / "checkpoints"))


def test_retention_deletes_nothing_when_the_new_checkpoint_does_not_match_its_manifest(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        folder = root / f"step_{step:08d}"
        folder.mkdir(parents=True)
        (folder / "weights.pt").write_bytes(b"x" * 10)
        files = {"weights.pt": {"bytes": 10 if step != 6 else 11, "crc32": "0"}}
        (folder / checkpoint.MANIFEST).write_text(json.dumps({"files": files}))
        (folder / checkpoint.MARKER).write_text("")
    checkpoint._retain(root, root / "step_00000006", keep_last=1)  # its file reads back short
    assert len(complete_checkpoints(root)) == 3
    checkpoint._retain(root, root / "step_00000002", keep_last=1)  # never the new one, nor newer ones
    assert len(complete_checkpoints(root)) == 3


def test_cuda_generators_are_saved_and_restored(monkeypatch):
    """Simulated: no GPU here. The RNG file carries this rank's CUDA generator and resume sets it back."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.ByteTensor([1, 2, 3]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", restored.append)
    state = checkpoint.rng_state()
    assert state["cuda"].tolist() == [1, 2, 3]
    cpu = torch.get_rng_state()
    torch.rand(3)
    checkpoint.restore_rng(state)
    assert torch.equal(torch.get_rng_state(), cpu) and [s.tolist() for s in restored] == [[1, 2, 3]]
