"""Peak memory and time of a training step with the LM head and loss chunked (models/chunked_loss.py) against
the full (B, T, V) logits, at configs/xlstm_125m.yaml's shapes cut to 2 layers (CPU, fp32, a few minutes).

    python bench/lm_head_memory.py [--seq-len 4096] [--layers 2] [--repeats 2]

Memory: one subprocess per path runs one forward + backward of one sequence and reports its peak resident
memory above what it held before the step (VmHWM - VmRSS, /proc/self/status: the parent's peak does not
carry into a child's reading). Time: both paths in this process, interleaved, best of `--repeats`. Goal:
peak <= 0.5x of the full logits' (issue "Performance that carries to the GPU").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from models import CausalLM, ModelConfig  # noqa: E402

GOAL = 0.5


def build(layers: int, seq_len: int) -> tuple[CausalLM, torch.Tensor]:
    raw = yaml.safe_load((ROOT / "configs" / "xlstm_125m.yaml").read_text())["model"]
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(**raw | {"n_layers": layers, "max_seq_len": seq_len}))
    ids = torch.randint(0, model.cfg.vocab_size, (1, seq_len + 1))
    return model, ids


def step(model: CausalLM, ids: torch.Tensor, chunked: bool) -> float:
    out = model(ids[:, :-1], labels=ids[:, 1:], return_logits=not chunked)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return out.loss.item()


def kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
    return int(line.split()[1])


def child(layers: int, seq_len: int, chunked: bool) -> None:
    model, ids = build(layers, seq_len)
    before = kib("VmRSS:")
    loss = step(model, ids, chunked)
    print(json.dumps({"peak_mib": (kib("VmHWM:") - before) / 1024, "loss": loss}))


def peak(layers: int, seq_len: int, chunked: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", "chunked" if chunked else "full", "--seq-len", str(seq_len),
           "--layers", str(layers)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", choices=["full", "chunked"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.layers, args.seq_len, args.child == "chunked")
        return 0
    torch.set_num_threads(max(1, torch.get_num_threads()))
    full, chunked = peak(args.layers, args.seq_len, False), peak(args.layers, args.seq_len, True)
    model, ids = build(args.layers, args.seq_len)
    times = {False: [], True: []}
    for _ in range(args.repeats):
        for c in (False, True):
            start = time.perf_counter()
            step(model, ids, c)
            times[c].append(time.perf_counter() - start)
    ratio = chunked["peak_mib"] / full["peak_mib"]
    print(f"xlstm_125m shapes, {args.layers} layers, T={args.seq_len}, vocab {model.cfg.vocab_size}, "
          f"chunks of {model.cfg.loss_chunk_tokens} tokens, fp32, CPU")
    print("| path | peak memory of a step (MiB) | step time (s, best) | loss |")
    print("|---|---|---|---|")
    print(f"| full (B, T, V) logits | {full['peak_mib']:.0f} | {min(times[False]):.2f} | {full['loss']:.6f} |")
    print(f"| chunked head + loss | {chunked['peak_mib']:.0f} | {min(times[True]):.2f} | {chunked['loss']:.6f} |")
    print(f"memory ratio chunked / full: {ratio:.2f} (goal <= {GOAL}); time ratio: "
          f"{min(times[True]) / min(times[False]):.2f}")
    return 0 if ratio <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
