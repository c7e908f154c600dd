"""Run configs: overrides, derived DeepSpeed config, LR schedules, and bad configs that must stop early."""

import subprocess
import sys

import pytest
import yaml
from harness import ROOT, TINY, job_env

from train.config import ConfigError, ScheduleConfig, load_config
from train.deepspeed_config import deepspeed_config
from train.schedule import lr_at

TINY_TRANSFORMER = TINY / "transformer.yaml"


def test_every_shipped_run_config_validates():
    paths = [p for p in sorted((ROOT / "configs").rglob("*.yaml")) if "recall" not in p.parts]  # eval recipes
    assert len(paths) > 20
    for path in paths:
        load_config(path)


def test_set_overrides_any_nested_field():
    cfg = load_config(TINY_TRANSFORMER, ["optim.lr=1e-4", "model.attention.rope_theta=500000", "parallel.zero_stage=3"])
    assert cfg.optim.lr == 1e-4
    assert cfg.model.attention.rope_theta == 500000
    assert cfg.parallel.zero_stage == 3


def test_deepspeed_config_derives_batch_and_accumulation():
    cfg = load_config(TINY_TRANSFORMER, ["data.tokens_per_step=4096", "data.micro_batch_size=4", "data.seq_len=128",
                                         "deepspeed.zero_optimization.overlap_comm=true"])
    ds = deepspeed_config(cfg, dp_size=2)
    assert ds["gradient_accumulation_steps"] == 4096 // (4 * 128 * 2)
    assert ds["train_batch_size"] == 4 * 2 * ds["gradient_accumulation_steps"]
    # The passthrough merges into the derived section instead of replacing it.
    assert ds["zero_optimization"] == {"stage": cfg.parallel.zero_stage, "overlap_comm": True}


@pytest.mark.parametrize("kind", ["cosine", "wsd", "constant"])
def test_schedules_warm_up_then_stay_within_bounds(kind):
    cfg = ScheduleConfig(kind=kind, steps=100, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    lrs = [lr_at(s, 1.0, cfg) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert all(0.1 - 1e-9 <= lr <= 1.0 for lr in lrs[10:])
    if kind == "cosine":
        assert lrs[-1] == pytest.approx(0.1, abs=1e-3) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    if kind == "wsd":
        assert lrs[10:80] == [1.0] * 70 and lrs[-1] == pytest.approx(0.1 + 0.9 / 20)


BAD_CONFIGS = {
    "unknown_key": (["model.d_modle=64"], "model.d_modle: unknown key"),
    "unknown_section": (["optimizer.lr=1"], "optimizer: unknown key"),
    "wrong_type": (["model.n_layers=two"], "model.n_layers"),
    "negative_lr": (["optim.lr=-0.001"], "optim.lr"),
    "zero_stage_4": (["parallel.zero_stage=4"], "parallel.zero_stage"),
    "heads_do_not_divide_width": (["model.n_heads=5"], "not divisible by n_heads"),
    "seq_len_over_model_max": (["data.seq_len=256", "data.micro_batch_size=8"], "exceeds model.max_seq_len"),
    "warmup_longer_than_run": (["schedule.warmup_steps=100000"], "warmup_steps"),
    "unknown_mixer": (["model.mixer=lstm"], "unknown mixer"),
    "pattern_does_not_divide_depth": (["model.pattern=AAA"], "not a multiple of len(pattern)"),
    "micro_batch_does_not_divide_batch": (["data.tokens_per_step=1000"], "tokens_per_step"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_stops_with_a_message_naming_the_key(name):
    overrides, expected = BAD_CONFIGS[name]
    with pytest.raises(ConfigError, match=None) as err:
        load_config(TINY_TRANSFORMER, overrides, world_size=2)
    assert expected in str(err.value)


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    partial = tmp_path / "partial.yaml"
    partial.write_text(yaml.safe_dump({"run_dir": "x"}))
    with pytest.raises(ConfigError, match="model: required key is missing"):
        load_config(partial)


def test_cli_exits_nonzero_with_the_message_before_any_process_group():
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", str(TINY_TRANSFORMER),
           "--set", "optim.lr=-1", "--set", "model.d_modle=3"]
    proc = subprocess.run(cmd, env=job_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "optim.lr" in proc.stderr and "model.d_modle: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_tiny_configs_share_the_demo_data_section():
    # One prepared corpus serves every tiny family (and the tests' shared shards fixture).
    expected = yaml.safe_load(TINY_TRANSFORMER.read_text())["data"]
    for path in sorted(TINY.glob("*.yaml")):
        assert yaml.safe_load(path.read_text())["data"] == expected, path.name


GPU_LIMITS = [  # (config, overrides, what the message names): each validated before this schema checked it
    ("xlstm", ["model.mlstm.chunk_size=48"], "mlstm.chunk_size=48: the Triton mLSTM kernel"),
    ("hgrn2", ["model.hgrn2.chunk_size=64"], "hgrn2.chunk_size=64: the Triton GLA kernel"),
    ("mom", ["model.mom.chunk_size=32"], "mom.chunk_size=32: the Triton gated delta rule kernel"),
    ("hgrn2", ["model.hgrn2.expand_ratio=512", "model.d_model=2048"], "hgrn2.expand_ratio=512: the Triton GLA"),
    ("mom", ["model.mom.head_dim=512"], "mom.head_dim=512: the Triton gated delta rule kernel"),
    ("gated_deltanet", ["model.gated_deltanet.chunk_size=64"], "gated_deltanet.chunk_size=64: the Triton gated"),
    ("gated_deltanet", ["model.gated_deltanet.head_dim=512"], "gated_deltanet.head_dim=512: the Triton gated"),
    ("gated_deltanet", ["model.gated_deltanet.conv_size=5"], "gated_deltanet.conv_size=5: causal-conv1d"),
    ("mamba", ["model.mamba.d_conv=5"], "mamba.d_conv=5: causal-conv1d"),
    ("mamba2", ["model.mamba2.d_conv=6"], "mamba2.d_conv=6: causal-conv1d"),
    ("mamba", ["model.mamba.d_state=512"], "mamba.d_state=512: mamba-ssm's selective scan"),
    ("transformer", ["model.d_model=512", "model.n_heads=1"], "the head size of the ['attention'] layers)=512"),
    ("scout", ["model.d_model=2048"], "the head size of the ['scout'] layers)=512: flash-attn"),
]


@pytest.mark.parametrize("family,overrides,message", GPU_LIMITS, ids=[o[0].split("=")[0] for _, o, _ in GPU_LIMITS])
def test_a_limit_of_a_gpu_path_stops_the_config_on_every_machine(family, overrides, message):
    with pytest.raises(ConfigError, match="GPU path") as err:
        load_config(TINY / f"{family}.yaml", overrides)
    assert message in str(err.value)
