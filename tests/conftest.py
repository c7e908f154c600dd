"""Test-wide setup: offline, CPU, Triton interpreter; and a runner for real multi-rank training jobs."""

import os

# Must be set before any @triton.jit function is defined, i.e. before kernels are imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from harness import PRETRAIN, ROOT, TINY, Run, job_env, launch_command  # noqa: E402


def pytest_configure(config):
    # A bare `pytest` from an interpreter without the project's packages would fail 29 collections with
    # tracebacks: say once what to run instead.
    import importlib.util

    missing = [m for m in ("torch", "transformers", "deepspeed") if importlib.util.find_spec(m) is None]
    if missing:
        raise pytest.UsageError(f"{sys.executable} lacks {', '.join(missing)}: run the tests in the project's "
                                "environment, `bash scripts/setup.sh && .venv/bin/python -m pytest -q`")


@pytest.fixture
def cuda_packages(monkeypatch):
    """mamba-ssm, causal-conv1d and flash-attn importable on the CPU (tests/cuda_standins.py), for one test."""
    import cuda_standins

    cuda_standins.install(monkeypatch)
    yield
    cuda_standins.uninstall()


@pytest.fixture(scope="session")
def stdlib_shards(tmp_path_factory) -> Path:
    """The demo corpus (Python's own stdlib sources) tokenized once for all training tests."""
    shards = tmp_path_factory.mktemp("shards") / "stdlib"
    cmd = [sys.executable, str(ROOT / "launch" / "prepare_data.py"), "--config", str(TINY / "transformer.yaml"),
           "--set", f"data.shards_dir={shards}"]
    subprocess.run(cmd, check=True, env=job_env(), cwd=ROOT, capture_output=True, timeout=600)
    return shards


@pytest.fixture
def train(tmp_path, stdlib_shards):
    """Runs a real training job; returns a Run. Defaults: 2 ranks, DeepSpeed launcher, fresh run_dir."""

    def run(config: str | Path = TINY / "transformer.yaml", *overrides: str, nproc: int = 2,
            launcher: str = "deepspeed", run_dir: Path | None = None, extra=(), timeout: float = 600,
            check: bool = True, wandb: bool = False, entry: Path = PRETRAIN, env: dict | None = None) -> Run:
        """`entry` and `env`: another entry point (tests/train/fault_worker.py) and what it reads."""
        run_dir = run_dir or tmp_path / "run"
        base = [f"run_dir={run_dir}", f"data.shards_dir={stdlib_shards}", "logging.progress_bar=false"]
        base += [] if wandb else ["logging.wandb=disabled"]  # wandb's service costs ~15 s a run
        cmd = launch_command(Path(config), base + list(overrides), nproc, launcher, list(extra), entry)
        proc = subprocess.run(cmd, env=job_env() | (env or {}), cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
        result = Run(proc, run_dir)
        if check and proc.returncode != 0:
            raise AssertionError(f"training failed ({proc.returncode}):\n{result.output[-6000:]}")
        return result

    return run
