"""DeepSpeed-Ulysses: SP=2 on 2 gloo ranks gives the loss and gradients of the unsplit model, per family."""

import subprocess
import sys

import pytest
import torch
from harness import ROOT, TINY, free_port, job_env

from models import CausalLM
from train.config import ConfigError, load_config

pytestmark = pytest.mark.slow

# Each family adds its tiny config here once its mixer offers project / mix / output (with the overrides
# that make its head counts divide by 2).
FAMILIES = {"transformer": [], "xlstm": [], "hgrn2": [], "mamba2": ["model.mamba2.n_groups=2"]}


def reference(cfg) -> tuple[float, dict[str, torch.Tensor]]:
    sys.path.insert(0, str(ROOT / "tests" / "train"))
    from sp_worker import fixed_batch

    torch.manual_seed(cfg.seed)
    model = CausalLM(cfg.model)
    batch = fixed_batch(cfg.model.vocab_size)
    loss = model(batch["input_ids"], labels=batch["labels"]).loss
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def run_sp(config, tmp_path, *overrides) -> dict:
    out = tmp_path / "sp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "--master_addr", "127.0.0.1", str(ROOT / "tests" / "train" / "sp_worker.py"),
           str(config), str(out), "parallel.sequence_parallel_size=2", "parallel.precision=fp32",
           "data.tokens_per_step=512", *overrides]  # one micro batch: gradients are reduced at once
    proc = subprocess.run(cmd, env=job_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("zero_stage", [2, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_sp2_matches_the_unsplit_model(family, zero_stage, tmp_path):
    config = TINY / f"{family}.yaml"
    result = run_sp(config, tmp_path, f"parallel.zero_stage={zero_stage}", *FAMILIES[family])
    loss, grads = reference(load_config(config, ["parallel.precision=fp32", *FAMILIES[family]]))
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
    for stage in (2, 3):
        run = train(TINY / "transformer.yaml", "parallel.sequence_parallel_size=2", f"parallel.zero_stage={stage}",
                    "schedule.steps=40", run_dir=tmp_path / f"zero{stage}")
        assert run.losses[-1] < run.losses[0] - 0.5, run.losses
