"""Bad data, tokenizers and checkpoints stop the job with a message naming the problem and the fix."""

import subprocess
import sys

import pytest
from harness import ROOT, TINY, job_env

pytestmark = pytest.mark.slow


def prepare(*overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "launch" / "prepare_data.py"), "--config", str(TINY / "transformer.yaml")]
    cmd += [a for o in overrides for a in ("--set", o)]
    return subprocess.run(cmd, env=job_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_missing_data_path(tmp_path):
    proc = prepare(f"data.sources=[{tmp_path}/nowhere/*.jsonl]", f"data.shards_dir={tmp_path}/shards")
    assert proc.returncode != 0
    assert "nowhere" in proc.stderr and "Traceback" not in proc.stderr


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    proc = prepare(f"data.sources=[{tmp_path}/empty.jsonl]", f"data.shards_dir={tmp_path}/shards")
    assert proc.returncode != 0
    assert "empty" in proc.stderr.lower() and "Traceback" not in proc.stderr


def test_training_on_shards_never_prepared(train, tmp_path):
    run = train(TINY / "transformer.yaml", f"data.shards_dir={tmp_path}/not-prepared", launcher="python",
                check=False)
    assert run.proc.returncode != 0
    assert "prepare_data.py" in run.output and "Traceback" not in run.proc.stderr


def test_a_config_error_is_said_once_not_by_every_rank(train):
    run = train(TINY / "transformer.yaml", "optim.lr=-1", nproc=2, launcher="deepspeed", check=False)
    assert run.proc.returncode != 0
    assert run.proc.stderr.count("error: ") == 1 and "optim.lr" in run.proc.stderr, run.proc.stderr[-2000:]
    assert "Traceback" not in run.proc.stderr


def test_tokenizer_vocabulary_larger_than_the_model(train):
    run = train(TINY / "transformer.yaml", "model.vocab_size=1000", launcher="python", check=False)
    assert run.proc.returncode != 0
    assert "vocab_size" in run.output and "2048" in run.output and "1000" in run.output


def test_checkpoint_from_a_different_model_shape(train, tmp_path):
    run_dir = tmp_path / "run"
    train(TINY / "transformer.yaml", "schedule.steps=2", "schedule.warmup_steps=1", launcher="python",
          run_dir=run_dir)
    resumed = train(TINY / "transformer.yaml", "schedule.steps=4", "schedule.warmup_steps=1", "model.d_model=96",
                    launcher="python", run_dir=run_dir, extra=["--resume", "auto"], check=False)
    assert resumed.proc.returncode != 0
    assert "different model" in resumed.output and "model.d_model: checkpoint 64 vs config 96" in resumed.output


def test_resume_from_an_incomplete_checkpoint_folder(train, tmp_path):
    partial = tmp_path / "checkpoints" / "step_00000010"
    partial.mkdir(parents=True)
    run = train(TINY / "transformer.yaml", launcher="python", extra=["--resume", str(partial)], check=False)
    assert run.proc.returncode != 0
    assert "not a complete checkpoint" in run.output


def test_checkpoint_written_before_new_config_sections_still_resumes(tmp_path):
    import json

    from train.checkpoint import check_model_config
    from train.config import load_config

    current = load_config(TINY / "transformer.yaml").model.model_dump(mode="json")
    older = {k: v for k, v in current.items() if k not in ("scout", "bst")}  # as saved before those landed
    (tmp_path / "model_config.json").write_text(json.dumps(older))
    check_model_config(tmp_path, current)  # no error: the missing sections take their defaults
