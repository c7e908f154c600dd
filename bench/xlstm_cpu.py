"""CPU training throughput of our xLSTM against transformers' native xLSTMForCausalLM, and length scaling.

Same tiny shape (configs/tiny/xlstm.yaml) and the same weights on both sides; one training step is
forward + backward of the next-token loss (no optimizer step). Prints:

- tokens/s of ours and of transformers' native PyTorch xLSTM, and their ratio;
- the mLSTM op alone (forward + backward at the tiny model's head shapes, T=512): our chunkwise reference
  (what the CPU runs) against NX-AI's mlstm_kernels native chunkwise kernel, the strongest CPU peer;
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
# bench/mlstm_kernels.py would shadow NX-AI's package of that name: drop bench/ from the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from transformers import xLSTMForCausalLM  # noqa: E402

from models import CausalLM, ModelConfig  # noqa: E402
from models.hf import xlstm as hf_xlstm  # noqa: E402


def train_step_ours(model: CausalLM, tokens: torch.Tensor, labels: torch.Tensor) -> None:
    model(tokens, labels=labels, return_logits=False).loss.backward()  # the trainer's path (chunked LM head)


def mlstm_op_seconds(cfg: ModelConfig, batch: int, seq_len: int, repeats: int) -> dict[str, float] | None:
    """Median forward + backward time of the mLSTM op, ours (mixer_kernels/mlstm reference) and mlstm_kernels'
    native chunkwise, interleaved; None without mlstm_kernels."""
    try:
        from mlstm_kernels.torch.chunkwise.native import mlstm_chunkwise__native_autograd
    except ImportError:
        return None
    from mixer_kernels.mlstm.reference import mlstm_chunkwise

    heads, chunk = cfg.n_heads, cfg.mlstm.chunk_size
    dqk, dv = int(cfg.d_model * cfg.mlstm.qk_dim_factor) // heads, int(cfg.d_model * cfg.mlstm.v_dim_factor) // heads
    q, k = (torch.randn(batch, heads, seq_len, dqk, requires_grad=True) for _ in range(2))
    v = torch.randn(batch, heads, seq_len, dv, requires_grad=True)
    i, f = (torch.randn(batch, heads, seq_len, requires_grad=True) for _ in range(2))
    steps = {"ours": lambda *_: mlstm_chunkwise(q, k, v, i, f, chunk_size=chunk)[0].sum().backward(),
             "mlstm_kernels": lambda *_: mlstm_chunkwise__native_autograd(q, k, v, i, f, chunk_size=chunk).sum().backward()}
    return seconds_per_step(steps, batch, seq_len, 2, repeats)


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

    op = mlstm_op_seconds(cfg, batch, seq_len, repeats=15)
    if op is None:
        print("mLSTM op: mlstm_kernels not installed, no peer")
    else:
        print(f"mLSTM op forward + backward at B={batch}, T={seq_len}: ours {op['ours'] * 1e3:.1f} ms, mlstm_kernels "
              f"native chunkwise {op['mlstm_kernels'] * 1e3:.1f} ms; ratio (speed) ours / mlstm_kernels "
              f"{op['mlstm_kernels'] / op['ours']:.2f}x (goal >= 1.0)")

    short = seconds_per_step({"ours": steps["ours"]}, 8, 512, cfg.vocab_size, repeats=9)["ours"] / (8 * 512)
    long = seconds_per_step({"ours": steps["ours"]}, 1, 4096, cfg.vocab_size, repeats=9)["ours"] / 4096
    print(f"ours, time per token: T=512 (B=8) {short * 1e6:.1f} us, T=4096 (B=1) {long * 1e6:.1f} us, "
          f"ratio {long / short:.2f} (goal <= 1.3)")


if __name__ == "__main__":
    main()
