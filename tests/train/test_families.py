"""Every tiny config trains on 2 real gloo ranks with its own ZeRO stage, and the loss falls."""

import pytest
from harness import TINY

pytestmark = pytest.mark.slow

FAMILIES = sorted(p.stem for p in TINY.glob("*.yaml"))


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "xlstm"])  # the demo test covers it
def test_tiny_config_trains_on_two_ranks_and_loss_falls(family, train):
    run = train(TINY / f"{family}.yaml", "schedule.steps=60", "schedule.warmup_steps=10", "logging.every=10")
    losses = run.losses
    assert len(losses) == 6, run.output[-3000:]
    assert losses[-1] < losses[0] - 0.5, f"{family}: loss did not fall: {losses}"
