"""CPU training throughput of our xLSTM against transformers' native xLSTMForCausalLM, and length scaling.

Same tiny shape (configs/tiny/xlstm.yaml) and the same weights on both sides; one training step is
forward + backward of the next-token loss (no optimizer step). Prints:

- tokens/s of ours and of transformers' native PyTorch xLSTM, and their ratio;
- the mLSTM op alone (forward + backward at the tiny model's head shapes, T=512): our chunkwise reference
  (what the CPU runs) against NX-AI's mlstm_kernels native chunkwise kernel, the strongest CPU peer (the faster of
  its autograd and hand-written backwards);
- our time per token at T=4096 over T=512 (1.0 is perfectly linear in the sequence length).

Timings are medians of interleaved repeats, and each ratio is the median of the ratios within a repeat (the two
sides run back to back), so the machine's drift, up to 1.5x within an hour here, hits both sides alike.
With glibc malloc's defaults every large tensor freed goes back to the OS and the next is fresh pages, which
costs transformers' step (its (B, T, V) logits) far more than ours: `MALLOC_MMAP_THRESHOLD_=1073741824
MALLOC_TRIM_THRESHOLD_=4294967296 python bench/xlstm_cpu.py` measures both without it.
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


def mlstm_op_times(cfg: ModelConfig, batch: int, seq_len: int, repeats: int) -> dict[str, list[float]] | None:
    """Forward + backward times of the mLSTM op, ours (mixer_kernels/mlstm reference) and mlstm_kernels' native
    chunkwise, with autograd's backward and with its hand-written one, interleaved; None without mlstm_kernels."""
    try:
        from mlstm_kernels.torch.chunkwise.native import (
            mlstm_chunkwise__native_autograd,
            mlstm_chunkwise__native_custbw,
        )
    except ImportError:
        return None
    from mixer_kernels.mlstm.reference import mlstm_chunkwise

    heads, chunk = cfg.n_heads, cfg.mlstm.chunk_size
    dqk, dv = int(cfg.d_model * cfg.mlstm.qk_dim_factor) // heads, int(cfg.d_model * cfg.mlstm.v_dim_factor) // heads
    q, k = (torch.randn(batch, heads, seq_len, dqk, requires_grad=True) for _ in range(2))
    v = torch.randn(batch, heads, seq_len, dv, requires_grad=True)
    i, f = (torch.randn(batch, heads, seq_len, requires_grad=True) for _ in range(2))
    steps = {"ours": lambda *_: mlstm_chunkwise(q, k, v, i, f, chunk_size=chunk)[0].sum().backward(),
             "autograd": lambda *_: mlstm_chunkwise__native_autograd(q, k, v, i, f, chunk_size=chunk).sum().backward(),
             "custbw": lambda *_: mlstm_chunkwise__native_custbw(q, k, v, i, f, chunk_size=chunk).sum().backward()}
    return step_times(steps, batch, seq_len, 2, repeats)


def train_step_hf(model: xLSTMForCausalLM, tokens: torch.Tensor, labels: torch.Tensor) -> None:
    # use_cache=False: transformers' cache updates states in place, which breaks its backward pass.
    logits = model(tokens, use_cache=False).logits
    F.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()


def step_times(steps: dict, batch: int, seq_len: int, vocab: int, repeats: int) -> dict[str, list[float]]:
    """Wall times of one training step for each named step function, run interleaved: one list per name."""
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
    return times


def speedup(times: dict[str, list[float]], fast: str, slow: str) -> float:
    """How many times faster `fast` ran than `slow`: the median over repeats of their ratio within a repeat."""
    return statistics.median(s / f for f, s in zip(times[fast], times[slow]))


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
    t = step_times(steps, batch, seq_len, cfg.vocab_size, repeats=25)
    print(f"training tokens/s at B={batch}, T={seq_len} (forward + backward), medians:")
    for name, times in t.items():
        print(f"  {name:13s} {batch * seq_len / statistics.median(times):10.0f}")
    print(f"  ratio ours / transformers: {speedup(t, 'ours', 'transformers'):.2f}x (goal >= 1.5)")

    op = mlstm_op_times(cfg, batch, seq_len, repeats=25)
    if op is None:
        print("mLSTM op: mlstm_kernels not installed, no peer")
    else:
        ms = {name: statistics.median(times) * 1e3 for name, times in op.items()}
        peer = min(("autograd", "custbw"), key=ms.get)  # the faster of mlstm_kernels' two native backwards
        print(f"mLSTM op forward + backward at B={batch}, T={seq_len}: ours {ms['ours']:.1f} ms, mlstm_kernels "
              f"native chunkwise {ms['autograd']:.1f} ms (autograd) / {ms['custbw']:.1f} ms (hand-written "
              f"backward); ratio (speed) ours / mlstm_kernels {peer} {speedup(op, 'ours', peer):.2f}x (goal >= 1.0)")

    short = step_times({"ours": steps["ours"]}, 8, 512, cfg.vocab_size, repeats=9)["ours"]
    long = step_times({"ours": steps["ours"]}, 1, 4096, cfg.vocab_size, repeats=9)["ours"]
    short, long = statistics.median(short) / (8 * 512), statistics.median(long) / 4096
    print(f"ours, time per token: T=512 (B=8) {short * 1e6:.1f} us, T=4096 (B=1) {long * 1e6:.1f} us, "
          f"ratio {long / short:.2f} (goal <= 1.3)")


if __name__ == "__main__":
    main()
