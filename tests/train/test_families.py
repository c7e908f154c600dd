"""Every tiny config trains on 2 real gloo ranks with its own ZeRO stage, on packed documents (concat rows,
each document a fresh sequence: models/documents.py), in fp32 and in bf16 (the precision of every real
config; DeepSpeed's bf16 runs on the CPU): the fp32 loss falls, and the bf16 losses stay within 3e-3
(relative) of the fp32 ones, step by step (measured: at most 3e-4 over these 20 steps). A hybrid with every
pattern letter trains packed too."""

import json

import pytest
from harness import TINY

pytestmark = pytest.mark.slow

FAMILIES = sorted(p.stem for p in TINY.glob("*.yaml"))
STEPS = ["schedule.steps=20", "schedule.warmup_steps=5", "logging.every=5", "checkpoint.every=100"]
PACKED = ["data.mode=concat", "data.separate_documents=true"]
# torchrun starts the 2 ranks ~4 s sooner than DeepSpeed's two launcher processes (each imports DeepSpeed);
# the DeepSpeed launcher itself is covered by tests/train/test_training.py and the README demo.
LAUNCHER = "torchrun"


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_config_trains_packed_in_fp32_and_bf16_on_two_ranks(family, train, tmp_path):
    runs = {precision: train(TINY / f"{family}.yaml", *STEPS, *PACKED, f"parallel.precision={precision}",
                             run_dir=tmp_path / precision, launcher=LAUNCHER) for precision in ("fp32", "bf16")}
    for precision, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):  # the kernel report says what ran
        report = json.loads((runs[precision].run_dir / "kernels.json").read_text())
        assert report["dtype"] == dtype and report["documents"].startswith("packed documents")
    fp32, bf16 = runs["fp32"].losses, runs["bf16"].losses
    assert len(fp32) == len(bf16) == 4
    assert fp32[-1] < fp32[0] - 0.5, f"{family}: loss did not fall: {fp32}"
    assert bf16 == pytest.approx(fp32, rel=3e-3), f"{family}: bf16 {bf16} vs fp32 {fp32}"
    assert bf16 != fp32, "bf16 losses equal to fp32 ones to the last digit: bf16 did not run"


def test_a_hybrid_with_every_pattern_letter_trains_packed(train):
    letters = ["model.pattern=AXMmHRWBSG", "model.n_layers=10", "model.hgrn2.expand_ratio=16",
               "model.gated_deltanet.head_dim=16"]
    # 10 layers at 2 s a step on 2 CPU ranks: 8 steps are enough to see every layer train.
    short = ["schedule.steps=8", "schedule.warmup_steps=2", "logging.every=2", "checkpoint.every=100"]
    run = train(TINY / "hybrid.yaml", *short, *PACKED, *letters, launcher=LAUNCHER)
    losses = run.losses
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.2, losses
