"""DeepSpeed-Ulysses: SP=2 on 2 gloo ranks gives the loss and gradients of the unsplit model, per family."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness import ROOT, TINY, ZERO3_PARTITION_ALL, free_port, job_env

from models import CausalLM
from train.config import ConfigError, load_config

pytestmark = pytest.mark.slow

# name: (tiny config, overrides). Every family (the overrides make its head counts divide by 2), then variants
# whose split differs from the family default's. A family that lands later adds its case here.
SPLITS = {
    "transformer": ("transformer", []),
    "xlstm": ("xlstm", []),
    "hgrn2": ("hgrn2", []),
    "mamba": ("mamba", []),
    "mamba2": ("mamba2", ["model.mamba2.n_groups=2"]),
    "mom": ("mom", []),
    "bst": ("bst", []),
    "scout": ("scout", ["model.mamba2.n_groups=2"]),
    "gated_deltanet": ("gated_deltanet", []),
    "hybrid_gdn": ("hybrid_gdn", []),  # GGGA with GVA: each rank takes 1 q/k head and the 2 value heads it serves
    "mom-gla-capacity": ("mom", ["model.mom.backend=gla", "model.mom.capacity_factor=0.3",
                                 "model.mom.shared_memory=false"]),
    "bst-single_head": ("bst", ["model.bst.context=single_head"]),
    "bst-multi_head": ("bst", ["model.bst.context=multi_head"]),
    "scout-mamba": ("scout", ["model.scout.local_mixer=mamba"]),
    "scout-sliding_window": ("scout", ["model.scout.local_mixer=sliding_window"]),
    "hybrid-every-mixer": ("hybrid", ["model.pattern=AXMmHRWBSG", "model.n_layers=10", "model.mamba2.n_groups=2",
                                       "model.hgrn2.expand_ratio=16", "model.gated_deltanet.head_dim=16"]),
}


# Packed documents (tests/train/sp_worker.py PACKED_CU_SEQLENS) under SP=2 against SP=1 packed: every family at
# ZeRO-2, and the hybrid with every mixer at ZeRO-3 too.
PACKED = [*(f"{split}-2" for split in SPLITS if "-" not in split), "hybrid-every-mixer-2", "hybrid-every-mixer-3"]


def reference(cfg, packed: bool = False, seq_len: int = 64, rows: int = 2) -> tuple[float, dict[str, torch.Tensor]]:
    """The unsplit model on one process: mean loss and gradients over micro batches of 2 rows (the rows of
    every replica's every micro batch), as gradient accumulation takes them. Per micro batch, not over all
    rows at once: MoM's load-balancing loss is not linear in the batch."""
    sys.path.insert(0, str(ROOT / "tests" / "train"))
    from sp_worker import fixed_batch

    torch.manual_seed(cfg.seed)
    model = CausalLM(cfg.model)
    batch = fixed_batch(cfg.model.vocab_size, batch=rows, seq_len=seq_len, packed=packed)
    total = 0.0
    for start in range(0, rows, 2):
        micro = {k: v if k == "cu_seqlens" else v[start:start + 2] for k, v in batch.items()}
        loss = model(micro["input_ids"], labels=micro["labels"], cu_seqlens=micro.get("cu_seqlens")).loss / (rows // 2)
        loss.backward()
        total += loss.item()
    # An unused parameter (the first HGRN2 layer's lower bound) has no gradient here and zeros under DeepSpeed.
    return total, {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in model.named_parameters()}


def run_sp(cases: dict[str, tuple], tmp: Path, split: str = "parallel.sequence_parallel_size=2", nproc: int = 2,
           seq_len: int = 64, micro_batches: int = 1, extra: list[str] = ()) -> dict[str, dict]:
    """name -> (config, overrides): every case in one SP=2 job on nproc ranks (tests/train/sp_worker.py), or
    whatever split `split` sets; names starting with 'packed-' run on packed documents."""
    common = [split, *extra, "parallel.precision=fp32",
              "data.tokens_per_step=512"]  # one micro batch: gradients are reduced at once
    jobs = [{"config": str(config), "overrides": [*common, *overrides], "out": str(tmp / f"{name}.pt"),
             "packed": name.startswith("packed-"), "seq_len": seq_len, "micro_batches": micro_batches}
            for name, (config, overrides) in cases.items()]
    (tmp / "cases.json").write_text(json.dumps(jobs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "--master_addr", "127.0.0.1", str(ROOT / "tests" / "train" / "sp_worker.py"),
           str(tmp / "cases.json")]
    proc = subprocess.run(cmd, env=job_env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {name: torch.load(tmp / f"{name}.pt", weights_only=True) for name in cases}


def case(split: str, zero_stage: int, table: dict = SPLITS) -> tuple[Path, list[str]]:
    """(tiny config, overrides) of `table[split]` at this ZeRO stage (ZeRO-3 partitioning every parameter)."""
    family, overrides = table[split]
    zero = [f"parallel.zero_stage={zero_stage}"] + ([ZERO3_PARTITION_ALL] if zero_stage == 3 else [])
    return TINY / f"{family}.yaml", [*zero, *overrides]


@pytest.fixture(scope="module")
def sp_results(tmp_path_factory) -> dict[str, dict]:
    """Every split at ZeRO-2 and ZeRO-3, in one job."""
    cases = {f"{split}-{stage}": case(split, stage) for stage in (2, 3) for split in SPLITS}
    cases |= {f"packed-{name}": case(name[:-2], int(name[-1])) for name in PACKED}
    return run_sp(cases, tmp_path_factory.mktemp("sp"))


@pytest.mark.parametrize("zero_stage", [2, 3])
@pytest.mark.parametrize("split", SPLITS)
def test_sp2_matches_the_unsplit_model(split, zero_stage, sp_results):
    assert_matches_unsplit(split, zero_stage, sp_results[f"{split}-{zero_stage}"], packed=False)


@pytest.mark.parametrize("name", PACKED)
def test_sp2_on_packed_documents_matches_the_unsplit_model(name, sp_results):
    assert_matches_unsplit(name[:-2], int(name[-1]), sp_results[f"packed-{name}"], packed=True)


def assert_matches_unsplit(split: str | None, zero_stage: int, result: dict, packed: bool, seq_len: int = 64,
                           config: tuple | None = None, rows: int = 2) -> None:
    config, overrides = config or case(split, zero_stage)
    loss, grads = reference(load_config(config, ["parallel.precision=fp32", *overrides]), packed, seq_len, rows)
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["grads"].keys() == grads.keys()
    for name, grad in grads.items():
        err = ((result["grads"][name] - grad).norm() / grad.norm().clamp_min(1e-12)).item()
        assert err < 1e-5, f"{name}: relative error {err:.2e}"


def test_sp_with_too_few_heads_or_short_sequences_stops_before_any_process_group():
    with pytest.raises(ConfigError, match="not divisible by parallel.sequence_parallel_size=2"):
        load_config(TINY / "transformer.yaml", ["parallel.sequence_parallel_size=2", "model.n_heads=1"], world_size=2)
    with pytest.raises(ConfigError, match="data.seq_len=127"):
        load_config(TINY / "transformer.yaml", ["parallel.sequence_parallel_size=2", "data.mode=concat",
                                                 "data.seq_len=127", "data.tokens_per_step=2032"], world_size=2)
    with pytest.raises(ConfigError, match="does not divide the world size"):
        load_config(TINY / "transformer.yaml", ["parallel.sequence_parallel_size=2"], world_size=3)


def test_sp2_trains_with_zero_2_and_3(train, tmp_path):
    # xLSTM, the headline family (the choice once it landed); attention's split has its own gradient test.
    for stage in (2, 3):
        run = train(TINY / "xlstm.yaml", "parallel.sequence_parallel_size=2", f"parallel.zero_stage={stage}",
                    "schedule.steps=40", run_dir=tmp_path / f"zero{stage}")
        assert run.losses[-1] < run.losses[0] - 0.5, run.losses


def test_ulysses_comm_bench_measures_the_analytic_volume():
    sys.path.insert(0, str(ROOT / "bench"))
    import ulysses_comm

    for seq_len, sp in [(256, 2), (512, 4)]:
        assert ulysses_comm.measured_bytes(seq_len, sp) == ulysses_comm.analytic_bytes(seq_len, sp) > 0


def test_sp2_zero3_run_resumes_from_its_last_checkpoint_exactly(train, tmp_path):
    # Mamba-1: the split with an extra collective (the all-reduce of x_proj), every parameter partitioned.
    overrides = ["parallel.sequence_parallel_size=2", "parallel.zero_stage=3", ZERO3_PARTITION_ALL,
                 "parallel.precision=fp32", "schedule.steps=6", "schedule.warmup_steps=2", "checkpoint.every=3",
                 "logging.every=1"]
    assert_resumes_exactly(train, TINY / "mamba.yaml", overrides)


def assert_resumes_exactly(train, config: Path, overrides: list[str]):
    """A 6-step run with checkpoints at steps 3 and 6 loses the second (as if killed before it), resumes from
    the first and reproduces steps 4-6. Returns the uninterrupted run."""
    full = train(config, *overrides)
    expected = {r["step"]: r["loss"] for r in full.records if "loss" in r}
    shutil.rmtree(full.run_dir / "checkpoints" / "step_00000006")  # as if killed before the last save
    resumed = train(config, *overrides, run_dir=full.run_dir, extra=["--resume", "auto"])
    assert "step_00000003" in resumed.output
    after = [r for r in resumed.records if "loss" in r][len(expected):]  # the resumed run's own lines
    assert [r["step"] for r in after] == [4, 5, 6]
    assert [r["loss"] for r in after] == pytest.approx([expected[s] for s in (4, 5, 6)], rel=1e-6)
    return full


def test_in_training_eval_under_sp2_runs_on_whole_sequences(train):
    # BST under ZeRO-3 with every parameter partitioned: the eval's unsplit forward reads parameters that
    # the split forward reads elsewhere.
    run = train(TINY / "bst.yaml", "parallel.sequence_parallel_size=2", "parallel.zero_stage=3", ZERO3_PARTITION_ALL,
                "schedule.steps=6", "schedule.warmup_steps=1", "eval.every=6", "eval.max_tokens=1024", "logging.every=1")
    (record,) = [r for r in run.records if "eval/ppl@128" in r]
    assert record["step"] == 6 and {"eval/ppl@256", "eval/ppl@512"} <= record.keys()
    # Held-out perplexity at the training length is near the training loss's, and below the vocabulary size.
    assert record["eval/ppl@128"] < 2048
    assert abs(math.log(record["eval/ppl@128"]) - run.losses[-1]) < 0.5, (record, run.losses)
