"""CPU throughput of our linear-recurrence paths (the chunk references the dispatchers use on the CPU)
against flash-linear-attention's strongest CPU-runnable PyTorch op on the same shapes, interleaved repeats:
for the gated delta rule fla's `naive_chunk_gated_delta_rule` (its chunk form), for GLA `naive_recurrent_gla`
(fla has no CPU chunk form of GLA with per-key decays: its chunk kernels are Triton); goal >= 1.0x. And how
time per token grows with the sequence: per-token time at T=4096 over T=512 (goal <= 1.3, linear in T).

    python bench/linear_attn_cpu.py [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixer_kernels.delta_rule.reference import delta_rule_chunk  # noqa: E402
from mixer_kernels.gla.reference import gla_chunk  # noqa: E402

B, H, K, V = 1, 4, 64, 64


def inputs(T: int, kind: str):
    q = torch.randn(B, T, H, K)
    v = torch.randn(B, T, H, V)
    if kind == "gla":
        g = F.logsigmoid(2 + torch.randn(B, T, H, K))
        return q, 1 - g.exp(), v, g
    k = F.normalize(torch.randn(B, T, H, K), dim=-1)
    return F.normalize(q, dim=-1), k, v, F.logsigmoid(2 + torch.randn(B, T, H)), torch.rand(B, T, H)


def seconds(fn, *args, reps: int = 3) -> float:
    with torch.no_grad():
        fn(*args)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(*args)
            best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ours = {"gla": lambda q, k, v, g: gla_chunk(q, k, v, g, chunk_size=32),
            "delta_rule": lambda q, k, v, g, b: delta_rule_chunk(q, k, v, g, b, chunk_size=64)}
    try:
        from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule
        from fla.ops.gla.naive import naive_recurrent_gla

        fla = {"gla": lambda q, k, v, g: naive_recurrent_gla(q, k, v, g),
               "delta_rule": lambda q, k, v, g, b: naive_chunk_gated_delta_rule(q, k, v, g, b, chunk_size=64)}
    except ImportError:
        fla = {}
    print(f"B={B} H={H} K={K} V={V}, {args.threads} threads, forward only")
    for kind in ("gla", "delta_rule"):
        t512, t4096 = seconds(ours[kind], *inputs(512, kind)), seconds(ours[kind], *inputs(4096, kind))
        line = (f"{kind:10s} ours: {B * 512 / t512:9.0f} tok/s at T=512, {B * 4096 / t4096:9.0f} tok/s at T=4096; "
                f"per-token time T=4096 / T=512 = {(t4096 / 4096) / (t512 / 512):.2f}")
        if kind in fla:
            x = inputs(512, kind)
            t_ours, t_fla = [], []
            for _ in range(3):  # interleaved, so machine noise hits both alike
                t_ours.append(seconds(ours[kind], *x, reps=1))
                t_fla.append(seconds(fla[kind], *x, reps=1))
            line += (f"; fla {'chunk' if kind == 'delta_rule' else 'recurrent'} {B * 512 / min(t_fla):8.0f} tok/s at "
                     f"T=512 (speed ours / fla = {min(t_fla) / min(t_ours):.2f}x, goal >= 1.0)")
        print(line, flush=True)


if __name__ == "__main__":
    main()
