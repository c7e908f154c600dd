"""End-to-end training on 2 real gloo ranks: loss falls, ZeRO stages agree, resume is exact, failures end the job."""

import json
import os
import resource
import signal
import subprocess
import time

import psutil
import pytest
from harness import FAULT_WORKER, ROOT, TINY, ZERO3_PARTITION_ALL, job_env, launch_command

pytestmark = pytest.mark.slow
FP32 = ["parallel.precision=fp32"]


def test_readme_demo_trains_tiny_xlstm_says_what_it_runs_and_loss_falls(train):
    run = train(TINY / "xlstm.yaml", wandb=True)  # the README's config, as shipped (wandb offline)
    losses = run.losses
    assert len(losses) >= 10, run.output[-3000:]
    first, last = losses[0], sum(losses[-3:]) / 3
    assert last < first - 1.0, f"loss did not fall enough: first {first:.3f}, last {last:.3f}"
    assert {"grad_norm", "lr", "tokens_per_s", "step_time_s", "peak_memory_mb",
            "model_flops_per_token"} <= run.records[-1].keys() and "mfu" not in run.records[-1]  # no GPU peak
    wandb_runs = list((run.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert wandb_runs, "no offline wandb run was written"
    assert b"kernel_report" in wandb_runs[0].read_bytes()  # the report is in the run's wandb config
    # The kernel report: every op on the reference, with its reason, on the console, in train.log and in
    # kernels.json; on 2 ranks only rank 0 reports.
    report = json.loads((run.run_dir / "kernels.json").read_text())
    assert report["device"] == "cpu" and [r["op"] for r in report["ops"]] == ["mlstm", "mlstm_step"]
    assert all(r["path"] == "reference" and not r["fallback"] and r["reason"] for r in report["ops"])
    log = (run.run_dir / "train.log").read_text()
    for text in (run.output, log):
        assert text.count("kernels on cpu (float32, strict=false):") == 1
        assert "mlstm       reference  PyTorch reference" in text and "auto on cpu" in text
    assert "[rank 0]" in log and "MFU is not reported: no GPU" in log


def test_zero_stages_0_to_3_give_the_same_losses(train, tmp_path):
    common = [*FP32, "schedule.steps=20", "logging.every=1", "checkpoint.every=1000"]
    curves = {}
    for stage in (0, 1, 2, 3):
        # Stage 1 goes through torchrun to show both launchers work.
        launcher = "torchrun" if stage == 1 else "deepspeed"
        partition = [ZERO3_PARTITION_ALL] if stage == 3 else []
        run = train(TINY / "transformer.yaml", *common, f"parallel.zero_stage={stage}", *partition,
                    run_dir=tmp_path / f"zero{stage}", launcher=launcher)
        curves[stage] = run.losses
    assert len(curves[0]) == 20
    for stage in (1, 2, 3):
        assert curves[stage] == pytest.approx(curves[0], rel=1e-5), f"ZeRO-{stage} differs from ZeRO-0"
    assert curves[0][-1] < curves[0][0]


def _losses_by_step(run_dir) -> dict[int, float]:
    from harness import Run

    return {r["step"]: r["loss"] for r in Run(None, run_dir).records}  # later lines (the resume) win


def _start(run_dir, stdlib_shards, *overrides, extra=()) -> subprocess.Popen:
    base = [f"run_dir={run_dir}", f"data.shards_dir={stdlib_shards}", "logging.wandb=disabled",
            "logging.progress_bar=false", *overrides]
    cmd = launch_command(TINY / "transformer.yaml", base, 2, "deepspeed", list(extra))
    return subprocess.Popen(cmd, env=job_env(), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_when(proc: subprocess.Popen, condition, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"run ended before the kill point:\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.001)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


RESUME = [*FP32, "schedule.steps=40", "logging.every=1", "checkpoint.every=20", "checkpoint.keep_last=5"]


def test_sigkill_after_a_checkpoint_then_resume_auto_reproduces_the_uninterrupted_run(train, tmp_path, stdlib_shards):
    reference = train(TINY / "transformer.yaml", *RESUME, run_dir=tmp_path / "reference")
    expected = _losses_by_step(reference.run_dir)
    assert sorted(expected) == list(range(1, 41))

    run_dir = tmp_path / "killed"
    marker = run_dir / "checkpoints" / "step_00000020" / "COMPLETE"
    _kill_when(_start(run_dir, stdlib_shards, *RESUME), marker.exists)
    train(TINY / "transformer.yaml", *RESUME, run_dir=run_dir, extra=["--resume", "auto"])
    got = _losses_by_step(run_dir)
    for step in range(21, 41):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), f"step {step}"


def test_kill_while_writing_a_checkpoint_resumes_from_the_previous_one(train, tmp_path, stdlib_shards):
    overrides = [*FP32, "schedule.steps=30", "logging.every=1", "checkpoint.every=10", "checkpoint.keep_last=5"]
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    # Kill the instant the step-20 folder appears: DeepSpeed has started writing, the marker is not there yet.
    _kill_when(_start(run_dir, stdlib_shards, *overrides), (ckpts / "step_00000020").exists)
    assert not (ckpts / "step_00000020" / "COMPLETE").exists(), "the kill came too late to test a partial write"
    resumed = train(TINY / "transformer.yaml", *overrides, run_dir=run_dir, extra=["--resume", "auto"])
    assert "resuming from" in resumed.output and "step_00000010" in resumed.output
    reference = train(TINY / "transformer.yaml", *overrides, run_dir=tmp_path / "reference")
    got, expected = _losses_by_step(run_dir), _losses_by_step(reference.run_dir)
    assert [got[s] for s in range(11, 31)] == pytest.approx([expected[s] for s in range(11, 31)], rel=1e-6, abs=1e-6)


def test_a_dead_rank_ends_the_whole_job_with_an_error(tmp_path, stdlib_shards):
    proc = _start(tmp_path / "run", stdlib_shards, "schedule.steps=100000", "logging.every=1",
                  "checkpoint.every=100000")
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.stat().st_size > 0):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    rank1 = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if p.environ().get("RANK") == "1" and "pretrain.py" in " ".join(p.cmdline())]
    assert len(rank1) == 1
    rank1[0].kill()
    start = time.monotonic()
    try:
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code != 0
    assert time.monotonic() - start < 120


def test_nonfinite_loss_is_skipped_then_stops_the_run_with_a_message(train):
    run = train(TINY / "transformer.yaml", "model.init_std=1e38", "optim.max_nonfinite_steps=3",
                "logging.every=1", check=False)
    assert run.proc.returncode != 0
    assert "loss was NaN/inf for 3 steps in a row" in run.output
    assert [r["skipped_steps"] for r in run.records] == [1, 2, 3]


def test_dry_run_of_the_1b_transformer_counts_parameters_without_allocating():
    cmd = [os.sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config",
           str(ROOT / "configs" / "transformer_1b.yaml"), "--dry-run"]
    proc = subprocess.run(cmd, env=job_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.JSONDecoder().raw_decode(proc.stdout)[0]
    m = report["config"]["model"]
    d, layers, vocab, hidden = m["d_model"], m["n_layers"], m["vocab_size"], m["ffn_hidden"]
    kv_dim = d // m["n_heads"] * m["attention"]["n_kv_heads"]
    per_layer = 2 * d * d + 2 * d * kv_dim + 3 * d * hidden + 2 * d  # q, o; k, v; SwiGLU; two norms
    analytic = vocab * d * (1 if m["tie_embeddings"] else 2) + layers * per_layer + d
    assert abs(report["dry_run"]["parameters"] - analytic) / analytic < 0.01
    assert 1.0e9 < analytic < 1.3e9
    assert report["dry_run"]["model_states_bytes_per_rank"] > 0
    # 1.1 B fp32 weights would take 4.4 GB; the meta device keeps the whole process far below that.
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 3 * 2**20  # KiB


def test_in_training_eval_runs_on_schedule_and_logs_perplexity_by_length(train):
    run = train(TINY / "transformer.yaml", "schedule.steps=4", "schedule.warmup_steps=1", "eval.every=2",
                "eval.max_tokens=2048", "logging.every=1", launcher="python")
    evals = [r for r in run.records if "eval/ppl@128" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert {"eval/ppl@256", "eval/ppl@512"} <= r.keys()
        assert all(1 < r[k] < 2048 for k in r if k.startswith("eval/ppl@"))  # below the vocabulary size
    assert len(run.losses) == 4


def test_in_training_eval_needs_held_out_documents():
    from train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.holdout_fraction"):
        load_config(TINY / "transformer.yaml", ["eval.every=10", "data.holdout_fraction=0"])


def test_the_old_name_of_separate_documents_is_a_clear_error():
    from train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="now data.separate_documents"):
        load_config(TINY / "mamba2.yaml", ["data.mode=concat", "data.reset_at_doc_boundary=true"])


@pytest.mark.parametrize("family", ["xlstm", "transformer"])
def test_a_training_step_reads_a_tensor_back_to_the_host_once(family, train, tmp_path):
    """The loop keeps losses and the non-finite flag on the device: per step one read-back (the skip and
    stop decision), plus one at a log step (the loss and auxiliary-loss means and the gradient norm), counted by
    tests/train/fault_worker.py COUNT_HOST_SYNCS in this project's code, on 2 ranks with 2 micro batches."""
    out = tmp_path / "syncs"
    train(TINY / f"{family}.yaml", "schedule.steps=7", "schedule.warmup_steps=1", "logging.every=3",
          "checkpoint.every=100", "data.tokens_per_step=2048", "data.micro_batch_size=4", launcher="torchrun",
          entry=FAULT_WORKER, env={"COUNT_HOST_SYNCS": str(out)})
    for rank in (0, 1):
        lines = (tmp_path / f"syncs.rank{rank}.jsonl").read_text().splitlines()
        counts = {r["step"]: r["syncs"] for r in map(json.loads, lines)}
        assert sorted(counts) == [1, 2, 3, 4, 5, 6]
        assert counts == {s: 2 if s % 3 == 0 else 1 for s in counts}, counts
