"""Training throughput of the tiny Transformer on 2 CPU ranks under ZeRO-0 and ZeRO-3, in one run.

    python bench/train_throughput.py [--config configs/tiny/transformer.yaml] [--steps 40]

Prints tokens/s of each stage (from the runs' metrics.jsonl, first logged interval excluded as warm-up)
and their ratio. On a GPU box the same script measures the real partitioning overhead.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(config: str, stage: int, steps: int, shards: str, out: Path, port: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    # ZeRO-3 with every parameter partitioned: DeepSpeed's persistence threshold would keep the tiny model's
    # parameters whole, which measures nearly ZeRO-0.
    partition_all = ["deepspeed.zero_optimization.stage3_param_persistence_threshold=0"] if stage == 3 else []
    overrides = [*partition_all, f"run_dir={out}", f"data.shards_dir={shards}", f"parallel.zero_stage={stage}",
                 f"schedule.steps={steps}", "logging.every=10", "logging.wandb=disabled",
                 "logging.progress_bar=false", f"checkpoint.every={steps * 10}"]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           str(ROOT / "launch" / "pretrain.py"), "--config", config]
    subprocess.run(cmd + [a for o in overrides for a in ("--set", o)], check=True, env=env, cwd=ROOT,
                   capture_output=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = records[1:] or records
    return sum(r["tokens_per_s"] for r in timed) / len(timed)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny" / "transformer.yaml"))
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = str(Path(tmp) / "shards")
        subprocess.run([sys.executable, str(ROOT / "launch" / "prepare_data.py"), "--config", args.config,
                        "--set", f"data.shards_dir={shards}"], check=True, cwd=ROOT, capture_output=True)
        tps = {stage: run(args.config, stage, args.steps, shards, Path(tmp) / f"zero{stage}", 29610 + stage)
               for stage in (0, 3)}
    print(f"{'stage':>6} {'tokens/s':>10}")
    for stage, value in tps.items():
        print(f"{'ZeRO-' + str(stage):>6} {value:10.0f}")
    print(f"ratio ZeRO-3 / ZeRO-0: {tps[3] / tps[0]:.2f}")


if __name__ == "__main__":
    main()
