"""Dataset decomposition (Grow-P2) against concat-and-chunk at the same maximum length: validation loss at
equal tokens seen, wall time to a target loss, and attention FLOPs spent (Pouransari et al., 2024's claim:
a long-context model at a short-context cost, reaching a target loss sooner).

    python bench/decomposition_time_to_loss.py [--families transformer xlstm] [--steps 120]

Each family's tiny config trains twice on 2 CPU ranks (launch/pretrain.py), same corpus (python-stdlib),
same token budget per step, schedule and seed; only `data.mode` differs (decompose with its grow_p2
curriculum, or concat rows of seq_len). The in-training evaluation scores the same held-out documents at
seq_len every `--eval-every` steps. The target loss is the worse of the two runs' final validation losses
(so both reach it); wall time to it is the training time (logged step times) up to the first evaluation at
or below it. Attention FLOPs: the part of the model's FLOPs per token that grows with the step's length
(attention's keys; for the xLSTM the chunkwise recurrence's in-chunk terms), models/flops.py, summed over
the tokens of every step (logged each step). Whatever it shows is the result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from models import CausalLM, ModelConfig  # noqa: E402


def run(family: str, mode: str, steps: int, eval_every: int, shards: str, out: Path) -> list[dict]:
    overrides = [f"run_dir={out}", f"data.shards_dir={shards}", f"data.mode={mode}", f"schedule.steps={steps}",
                 "logging.every=1", f"eval.every={eval_every}", "eval.max_tokens=16384", "eval.length_multiples=[1.0]",
                 "logging.wandb=disabled", "logging.progress_bar=false", f"checkpoint.every={steps * 10}"]
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(ROOT / "launch" / "pretrain.py"),
           "--config", str(ROOT / "configs" / "tiny" / f"{family}.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd + [a for o in overrides for a in ("--set", o)], check=True, env=env, cwd=ROOT,
                   capture_output=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """The FLOPs per training token at seq_len that grow with the length (attention's keys)."""
    with torch.device("meta"):
        model = CausalLM(cfg.model_copy(update={"max_seq_len": max(cfg.max_seq_len, seq_len)}))
    return model.flops_per_token(seq_len) - model.flops_per_token(1)


def summarize(records: list[dict], cfg: ModelConfig, tokens_per_step: int, eval_key: str) -> dict:
    train = [r for r in records if "loss" in r]
    evals = {r["step"]: math.log(r[eval_key]) for r in records if eval_key in r}
    wall, last_step, wall_at = 0.0, 0, {}
    attention = 0.0
    for r in train:
        n = r["step"] - last_step
        wall += r["step_time_s"] * n
        attention += n * tokens_per_step * attention_flops_per_token(cfg, r["seq_len"])
        last_step = r["step"]
        wall_at[r["step"]] = wall
    return {"evals": evals, "wall_at": wall_at, "attention_flops": attention, "wall": wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=["transformer", "xlstm"])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--eval-every", type=int, default=20)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = str(Path(tmp) / "shards")
        subprocess.run([sys.executable, str(ROOT / "launch" / "prepare_data.py"), "--config",
                        str(ROOT / "configs" / "tiny" / "transformer.yaml"), "--set", f"data.shards_dir={shards}"],
                       check=True, cwd=ROOT, capture_output=True)  # every tiny config shares this data section
        for family in args.families:
            raw = yaml.safe_load((ROOT / "configs" / "tiny" / f"{family}.yaml").read_text())
            cfg, data = ModelConfig(**raw["model"]), raw["data"]
            eval_key = f"eval/ppl@{data['seq_len']}"
            runs = {mode: summarize(run(family, mode, args.steps, args.eval_every, shards, Path(tmp) / f"{family}-{mode}"),
                                    cfg, data["tokens_per_step"], eval_key) for mode in ("decompose", "concat")}
            target = max(r["evals"][max(r["evals"])] for r in runs.values())
            print(f"\n{family}: {args.steps} steps of {data['tokens_per_step']} tokens, max length {data['seq_len']}, "
                  f"2 CPU ranks; validation loss at length {data['seq_len']}")
            print("| step | tokens seen | decompose (grow_p2) | concat |")
            print("|---|---|---|---|")
            for step in sorted(runs["concat"]["evals"]):
                print(f"| {step} | {step * data['tokens_per_step']} | {runs['decompose']['evals'].get(step, float('nan')):.4f} "
                      f"| {runs['concat']['evals'][step]:.4f} |")
            for mode, r in runs.items():
                reached = min((s for s, loss in r["evals"].items() if loss <= target), default=None)
                when = "not reached" if reached is None else f"{r['wall_at'].get(reached, r['wall']):.1f} s (step {reached})"
                print(f"{mode:9s}: wall time to loss {target:.4f}: {when}; training time {r['wall']:.1f} s; "
                      f"attention FLOPs {r['attention_flops']:.3g}")
            print(f"attention FLOPs decompose / concat: "
                  f"{runs['decompose']['attention_flops'] / runs['concat']['attention_flops']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
