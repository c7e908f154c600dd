"""Is training linear in the sequence length? Per-token training time at T=4096 over T=512, every recurrent family.

Each family's tiny config (configs/tiny/) at its own width, max_seq_len raised to 4096; one training step
is forward + backward of the next-token loss through the trainer's path (chunked LM head, no optimizer
step), at equal tokens per step (8 x 512 against 1 x 4096), so only the sequence length differs. A
chunkwise recurrence or scan is linear in T: the ratio should stay near 1.0 (goal <= 1.3). SCOUT runs at the
real configs' segment of 64 tokens (configs/scout_400m.yaml): its checkpoint attention costs T x T / S by
design, so each token reads T / S checkpoints, and the tiny config's 16 (sized for 128-token tests, 256
checkpoints at T=4096) is printed beside it without a goal, as is the Llama-style Transformer (quadratic).

Timings are medians of interleaved repeats (the two lengths alternate), so a burst of machine noise hits
both alike. Run: `python bench/length_scaling.py [--families xlstm,mamba] [--repeats 5]` (about 3 minutes
on 2 cores).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import CausalLM  # noqa: E402
from train.config import load_config  # noqa: E402

# name -> (configs/tiny file, label, model overrides, has the goal): the recurrent families, then contrasts.
FAMILIES = {
    "xlstm": ("xlstm", "mLSTM", {}, True),
    "mamba": ("mamba", "Mamba", {}, True),
    "mamba2": ("mamba2", "Mamba-2", {}, True),
    "hgrn2": ("hgrn2", "HGRN2", {}, True),
    "mom": ("mom", "MoM (delta rule)", {}, True),
    "gated_deltanet": ("gated_deltanet", "Gated DeltaNet", {}, True),
    "bst": ("bst", "BST", {}, True),
    "scout": ("scout", "SCOUT (S=64)", {"scout": {"segment_size": 64}}, True),
    "scout16": ("scout", "SCOUT (S=16)", {}, False),
    "transformer": ("transformer", "Transformer", {}, False),
}
SHORT, LONG, TOKENS = 512, 4096, 4096


def train_step(model: CausalLM, ids: torch.Tensor) -> None:
    model(ids, labels=ids, return_logits=False).loss.backward()


def per_token_ratio(config: str, overrides: dict, repeats: int) -> tuple[float, float, float]:
    """(us per token at SHORT, at LONG, LONG / SHORT): medians of interleaved training steps."""
    cfg = load_config(ROOT / "configs" / "tiny" / f"{config}.yaml").model
    sections = {key: getattr(cfg, key).model_copy(update=value) for key, value in overrides.items()}
    cfg = cfg.model_copy(update={"max_seq_len": LONG, **sections})
    torch.manual_seed(0)
    model = CausalLM(cfg).train()
    ids = {t: torch.randint(0, cfg.vocab_size, (TOKENS // t, t)) for t in (SHORT, LONG)}
    for t in ids:  # warm-up: allocator growth, first-call overheads
        train_step(model, ids[t])
    times = {t: [] for t in ids}
    for _ in range(repeats):
        for t in ids:
            start = time.perf_counter()
            train_step(model, ids[t])
            times[t].append(time.perf_counter() - start)
    short, long = (statistics.median(times[t]) / TOKENS * 1e6 for t in (SHORT, LONG))
    return short, long, long / short


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated configs/tiny names")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    unknown = sorted(set(args.families.split(",")) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    print(f"training time per token, T={LONG} (batch 1) over T={SHORT} (batch {TOKENS // SHORT}); fp32, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved repeats")
    met = []
    for name in args.families.split(","):
        config, label, overrides, has_goal = FAMILIES[name]
        short, long, ratio = per_token_ratio(config, overrides, args.repeats)
        goal = "(goal <= 1.3)" if has_goal else "(no goal: attention over T or T / 16 keys per token)"
        print(f"  {label:17s} T={SHORT} {short:7.1f} us   T={LONG} {long:7.1f} us   ratio {ratio:5.2f} {goal}",
              flush=True)
        if has_goal:
            met.append(ratio <= 1.3)
    print(f"goal met for {sum(met)} of {len(met)} recurrent families")


if __name__ == "__main__":
    main()
