"""A DeepSpeed checkpoint of a tiny xLSTM run exports to a folder that transformers loads natively."""

import subprocess
import sys

import pytest
import torch
from harness import ROOT, TINY, job_env
from transformers import AutoModelForCausalLM, AutoTokenizer

from models import CausalLM, ModelConfig
from train.checkpoint import complete_checkpoints, consolidated_state_dict

pytestmark = pytest.mark.slow


def test_trained_xlstm_exports_to_transformers_with_equal_logits_and_generation(train, tmp_path):
    run = train(TINY / "xlstm.yaml", "schedule.steps=6", "schedule.warmup_steps=2", "checkpoint.every=3",
                "parallel.zero_stage=2")
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "export_hf.py"), "--checkpoint", str(run.run_dir),
                           "--out", str(out)], env=job_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    config, state = consolidated_state_dict(complete_checkpoints(run.run_dir / "checkpoints")[-1])
    ours = CausalLM(ModelConfig(**config)).eval()
    ours.load_state_dict(state)
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == "xLSTMForCausalLM"
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("def main():\n    return 0\n", return_tensors="pt").input_ids[:, :37]
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids, use_cache=False).logits
    assert ((a - b).norm() / b.norm()).item() < 1e-5
    greedy = theirs.generate(ids[:, :8], max_new_tokens=10, do_sample=False)
    assert torch.equal(ours.generate(ids[:, :8], max_new_tokens=10), greedy)


def test_export_of_an_incomplete_checkpoint_is_refused(tmp_path):
    partial = tmp_path / "checkpoints" / "step_00000004"
    partial.mkdir(parents=True)
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "export_hf.py"), "--checkpoint", str(partial),
                           "--out", str(tmp_path / "hf")], env=job_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "not a complete checkpoint" in proc.stderr
