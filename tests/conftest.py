"""Test-wide setup: offline, CPU, Triton interpreter; and a runner for real multi-rank training jobs."""

import os

# Must be set before any @triton.jit function is defined, i.e. before kernels are imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TINY = ROOT / "configs" / "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Run:
    proc: subprocess.CompletedProcess
    run_dir: Path

    @property
    def records(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.records]

    @property
    def output(self) -> str:
        return self.proc.stdout + self.proc.stderr


def job_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def launch_command(config: Path, overrides: list[str], nproc: int, launcher: str, extra: list[str]) -> list[str]:
    port = str(free_port())
    script = [str(ROOT / "launch" / "pretrain.py"), "--config", str(config)]
    script += [a for o in overrides for a in ("--set", o)] + extra
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
                "--master_port", port, *script]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", port, "--master_addr", "127.0.0.1", *script]
    return [sys.executable, *script]


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
            check: bool = True) -> Run:
        run_dir = run_dir or tmp_path / "run"
        base = [f"run_dir={run_dir}", f"data.shards_dir={stdlib_shards}", "logging.wandb=disabled",
                "logging.progress_bar=false"]
        cmd = launch_command(Path(config), base + list(overrides), nproc, launcher, list(extra))
        proc = subprocess.run(cmd, env=job_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        result = Run(proc, run_dir)
        if check and proc.returncode != 0:
            raise AssertionError(f"training failed ({proc.returncode}):\n{result.output[-6000:]}")
        return result

    return run
