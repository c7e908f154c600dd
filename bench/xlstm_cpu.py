"""CPU training throughput of our xLSTM against transformers' native xLSTMForCausalLM, and length scaling.

Same tiny shape (configs/tiny/xlstm.yaml) and the same weights on both sides; one training step is
forward + backward of the next-token loss (no optimizer step). Prints:

- tokens/s of ours and of transformers' native PyTorch xLSTM, and their ratio;
- our time per token at T=4096 over T=512 (1.0 is perfectly linear in the sequence length).

Timings are medians of interleaved repeats, so a burst of machine noise hits both sides alike.
Run: `python bench/xlstm_cpu.py` (about a minute on 2 cores).
"""

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import xLSTMForCausalLM  # noqa: E402

from models import CausalLM, ModelConfig  # noqa: E402
from models.hf import xlstm as hf_xlstm  # noqa: E402


def train_step_ours(model: CausalLM, tokens: torch.Tensor, labels: torch.Tensor) -> None:
    model(tokens, labels=labels).loss.backward()


def train_step_hf(model: xLSTMForCausalLM, tokens: torch.Tensor, labels: torch.Tensor) -> None:
    # use_cache=False: transformers' cache updates states in place, which breaks its backward pass.
    logits = model(tokens, use_cache=False).logits
    F.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()


def seconds_per_step(steps: dict, batch: int, seq_len: int, vocab: int, repeats: int) -> dict[str, float]:
    """Median wall time of one training step for each named step function, run interleaved."""
    tokens = torch.randint(0, vocab, (batch, seq_len))
    labels = torch.randint(0, vocab, (batch, seq_len))
    times = {name: [] for name in steps}
    for step in steps.values():  # warm-up: allocator, first-call overheads
        step(tokens, labels)
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step(tokens, labels)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(**yaml.safe_load((ROOT / "configs" / "tiny" / "xlstm.yaml").read_text())["model"])
    ours = CausalLM(cfg).train()
    theirs = xLSTMForCausalLM(hf_xlstm.to_hf_config(cfg)).train()
    theirs.load_state_dict(hf_xlstm.to_hf_state_dict(ours.state_dict(), cfg), strict=True)
    steps = {
        "ours": lambda x, y: train_step_ours(ours, x, y),
        "transformers": lambda x, y: train_step_hf(theirs, x, y),
    }
    print(f"tiny xLSTM: d_model={cfg.d_model}, n_layers={cfg.n_layers}, n_heads={cfg.n_heads}, "
          f"vocab={cfg.vocab_size}, chunk={cfg.mlstm.chunk_size}; fp32, {torch.get_num_threads()} threads")

    batch, seq_len = 4, 512
    t = seconds_per_step(steps, batch, seq_len, cfg.vocab_size, repeats=15)
    rate = {name: batch * seq_len / s for name, s in t.items()}
    print(f"training tokens/s at B={batch}, T={seq_len} (forward + backward):")
    for name, r in rate.items():
        print(f"  {name:13s} {r:10.0f}")
    print(f"  ratio ours / transformers: {rate['ours'] / rate['transformers']:.2f}x (goal >= 1.5)")

    short = seconds_per_step({"ours": steps["ours"]}, 8, 512, cfg.vocab_size, repeats=9)["ours"] / (8 * 512)
    long = seconds_per_step({"ours": steps["ours"]}, 1, 4096, cfg.vocab_size, repeats=9)["ours"] / 4096
    print(f"ours, time per token: T=512 (B=8) {short * 1e6:.1f} us, T=4096 (B=1) {long * 1e6:.1f} us, "
          f"ratio {long / short:.2f} (goal <= 1.3)")


if __name__ == "__main__":
    main()
