"""CPU benchmark of the hybrids at tiny width (about a minute): what SCOUT's checkpoint attention saves.

1. At T=8192 with segments of S=64: attention FLOPs (counted by torch.utils.flop_counter) and peak memory
   (allocation events of the torch profiler) of SCOUT's checkpoint attention against full causal attention
   in the same eager formulation (scores, masked softmax, values), with the fused SDPA kernel's memory for
   reference, and the decoding state each keeps after T tokens. The analytic FLOP ratio is
   T * T / (T * (T / S + 1)), i.e. about S; the goal is to be within a factor 1.2 of it.
2. Forward time per token at T=4096 over T=512 for the tiny BST and SCOUT models (configs/tiny), and the
   Llama-style Transformer for comparison.

    python bench/hybrids_cpu.py
"""

import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixer_kernels.attention import attention, checkpoint_attention  # noqa: E402
from models import CausalLM  # noqa: E402
from train.config import load_config  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"


def eager_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full causal attention written out (T x T scores): the formulation SCOUT's op shortens to T x T/S."""
    t = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_bytes(fn) -> int:
    """Peak of live CPU allocations made during fn (replaying the profiler's allocation events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def scout_attention_cost(t: int = 8192, s: int = 64, heads: int = 4, head_dim: int = 16) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, t, head_dim) for _ in range(3))
    ck, cv = k[:, :, s - 1::s], v[:, :, s - 1::s]  # one checkpoint per completed segment
    n_visible = torch.arange(t) // s
    runs = {
        "full (eager)": lambda: eager_causal_attention(q, k, v),
        "full (fused SDPA)": lambda: attention(q, k, v),
        "SCOUT checkpoints": lambda: checkpoint_attention(q, k, v, ck, cv, n_visible),
    }
    with torch.no_grad():
        f = {name: flops(fn) for name, fn in runs.items()}
        mem = {name: peak_bytes(fn) for name, fn in runs.items()}
    analytic = t * t / (t * (t // s + 1))
    measured = f["full (eager)"] / f["SCOUT checkpoints"]
    print(f"attention at T={t}, S={s}, {heads} heads of {head_dim} (batch 1, fp32)")
    for name in runs:
        fl = f"{f[name] / 1e9:8.2f} GFLOP" if f[name] else "   (not counted: fused CPU kernel)"
        print(f"  {name:18s} {fl}   peak {mem[name] / 2**20:8.1f} MiB")
    print(f"  FLOP ratio full / SCOUT: {measured:.1f} (analytic T*T / (T*(T/S + 1)) = {analytic:.1f}; "
          f"within 1.2x: {max(measured / analytic, analytic / measured) <= 1.2})")
    print(f"  peak-memory ratio eager full / SCOUT: {mem['full (eager)'] / mem['SCOUT checkpoints']:.1f}")
    kv = 2 * heads * t * head_dim * 4
    ckpt = 2 * heads * (t // s) * head_dim * 4
    print(f"  decoding state after T tokens: KV cache {kv / 2**20:.2f} MiB, SCOUT checkpoints {ckpt / 2**20:.3f} MiB "
          f"(+ the local mixer's constant state), ratio {kv / ckpt:.0f}")


def per_token_times(name: str, lengths: tuple[int, ...], repeats: int = 3) -> dict[int, float]:
    """Best-of-`repeats` forward seconds per token at each length, after a warm-up at every length."""
    cfg = load_config(TINY / f"{name}.yaml").model.model_copy(update={"max_seq_len": max(lengths)})
    torch.manual_seed(0)
    model = CausalLM(cfg).eval()
    ids = {t: torch.randint(0, cfg.vocab_size, (1, t)) for t in lengths}
    best = dict.fromkeys(lengths, float("inf"))
    with torch.no_grad():
        for t in lengths:
            model(ids[t])  # warm-up: one-time FFT plans and allocator growth
        for _ in range(repeats):
            for t in lengths:  # interleaved, so a burst of load on the machine hits both lengths alike
                start = time.perf_counter()
                model(ids[t])
                best[t] = min(best[t], time.perf_counter() - start)
    return {t: best[t] / t for t in lengths}


def scaling() -> None:
    print("forward time per token, tiny configs (batch 1, fp32, best of 3)")
    for name in ("bst", "scout", "transformer"):
        per_token = per_token_times(name, (512, 4096))
        short, long = per_token[512], per_token[4096]
        print(f"  {name:12s} T=512 {short * 1e6:7.1f} us   T=4096 {long * 1e6:7.1f} us   ratio {long / short:.2f}")


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    scout_attention_cost()
    scaling()
    print(f"total {time.perf_counter() - start:.0f} s")
