"""The kernel-path report before the first step (train/kernel_report.py) on a simulated CUDA device whose fast
packages cannot be imported, the strict rule, MFU per GPU, and the dry-run table of every real config."""

import json
import logging
import time

import pytest
import torch
from harness import ROOT, TINY

from mixer_kernels import backend
from train import trainer
from train.config import load_config
from train.kernel_report import check_kernels, run_kernel_report
from train.metrics import MetricsLogger, peak_flops

FAMILIES = sorted(p.stem for p in TINY.glob("*.yaml"))


class FakeCudaTensor:
    """What `backend.choose` reads of a tensor, for one on cuda:0."""

    device, dtype = torch.device("cuda", 0), torch.bfloat16


@pytest.fixture
def cuda_without_fast_packages(monkeypatch):
    """A GPU box where the `cuda` extra (and triton) fail to import: the device check says CUDA."""
    monkeypatch.delenv(backend.ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(backend, "_fast_path_unavailable",
                        lambda op: f"ImportError: {op.package} was built against another torch")
    backend.reset_for_tests()
    yield trainer.current_device()
    backend.reset_for_tests()


@pytest.mark.parametrize("family", FAMILIES)
def test_strict_run_stops_before_the_first_step_naming_the_op_and_the_fix(family, cuda_without_fast_packages,
                                                                           tmp_path):
    cfg = load_config(TINY / f"{family}.yaml", ["parallel.precision=bf16"])
    with backend.using(cfg.kernels.backend, cfg.kernels.overrides, cfg.kernels.strict):
        report = run_kernel_report(cfg, cuda_without_fast_packages)
        assert report["device"] == "cuda:0" and report["strict"]
        with pytest.raises(backend.KernelFallbackError) as err:
            check_kernels(report, 0, tmp_path)
    fallen = [r["op"] for r in report["ops"] if r["fallback"]]
    assert fallen and all(op in str(err.value) for op in fallen)
    packages = {backend.OPS[op].package for op in fallen}
    assert ("pip install .[cuda]" in str(err.value)) == (packages != {"triton"})
    assert "pip install triton" in str(err.value) or "triton" not in packages


@pytest.mark.parametrize("family", ["mamba", "xlstm", "hybrid"])
def test_not_strict_warns_once_and_writes_the_rows(family, cuda_without_fast_packages, tmp_path, caplog):
    cfg = load_config(TINY / f"{family}.yaml", ["kernels.strict=false"])
    with backend.using(cfg.kernels.backend, cfg.kernels.overrides, cfg.kernels.strict), \
            caplog.at_level(logging.INFO):
        check_kernels(run_kernel_report(cfg, cuda_without_fast_packages), 0, tmp_path)
        rows = json.loads((tmp_path / "kernels.json").read_text())["ops"]
        for row in rows:  # then the dispatchers take those paths at every call, without warning again
            assert backend.choose(row["op"], FakeCudaTensor()).path == "reference"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "kernels.strict is false" in warnings[0].getMessage()
    fallen = [r for r in rows if r["fallback"]]
    assert fallen and all(r["path"] == "reference" and "another torch" in r["problem"] and r["fix"] for r in fallen)
    assert any("kernels on cuda:0" in r.getMessage() for r in caplog.records)  # the table, on rank 0


def test_reference_on_purpose_passes_strict(cuda_without_fast_packages, tmp_path):
    cfg = load_config(TINY / "mamba.yaml", ["kernels.backend=reference"])
    with backend.using(cfg.kernels.backend, cfg.kernels.overrides, cfg.kernels.strict):
        report = run_kernel_report(cfg, cuda_without_fast_packages)
        check_kernels(report, 0, tmp_path)
    assert all(r["path"] == "reference" and not r["fallback"] for r in report["ops"])


def test_unknown_override_is_a_config_error():
    from train.config import ConfigError

    with pytest.raises(ConfigError, match="unknown kernel op 'mlstmx'"):
        load_config(TINY / "xlstm.yaml", ["kernels.overrides={mlstmx: reference}"])


def test_mfu_is_per_gpu(tmp_path, monkeypatch):
    """2 GPUs at a fake peak of 1e12: the MFU of the job's FLOP/s is per GPU, not of the sum over one peak."""
    cfg = load_config(TINY / "transformer.yaml", ["logging.wandb=disabled", "logging.progress_bar=false"])
    clock = iter([100.0, 102.0])
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    metrics = MetricsLogger(tmp_path, cfg, rank=0, world_size=2, start_step=0, flops_per_token=lambda t: 1e6 * t,
                            resolved_config={}, peak=1e12)
    metrics.advance(tokens=4096, seq_len=128)
    metrics.advance(tokens=4096, seq_len=64)
    record = metrics.log(2, {"loss": 1.0})
    metrics.close()
    flops = 4096 * 1e6 * 128 + 4096 * 1e6 * 64
    assert record["tokens_per_s"] == 8192 / 2.0
    assert record["model_flops_per_token"] == flops / 8192
    assert record["mfu"] == pytest.approx(flops / 2.0 / (2 * 1e12))


def test_peak_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12 and peak_flops("NVIDIA B200") == 2250e12
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("NVIDIA GeForce RTX 4090") is None


REAL_CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_dry_run_of_every_real_config_prints_the_kernel_table(name, monkeypatch, capsys):
    from launch import pretrain

    monkeypatch.delenv(backend.ENV, raising=False)
    monkeypatch.setattr("sys.argv", ["pretrain.py", "--config", str(ROOT / "configs" / name), "--dry-run"])
    assert pretrain.main() == 0
    out = capsys.readouterr().out
    assert "kernels on cuda (bfloat16, strict=true):" in out
    report = json.JSONDecoder().raw_decode(out)[0]["dry_run"]
    assert report["kernels"]["ops"] and all(f"  {row['op']} " in out for row in report["kernels"]["ops"])
    model = json.JSONDecoder().raw_decode(out)[0]["config"]["model"]
    embedding = model["vocab_size"] * model["d_model"]  # a lookup, no FLOPs
    if not name.startswith("mom"):  # a MoM token passes through top_k of its memories' parameters only
        assert report["model_flops_per_token"] > 6 * (report["parameters"] - embedding)  # 6 N, plus mixing
