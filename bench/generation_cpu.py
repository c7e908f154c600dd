"""Greedy generation speed on the CPU: our `step` path against transformers' `generate()`, and cost per token
as the context grows.

    python bench/generation_cpu.py [--new-tokens 128] [--contexts 256,2048] [--threads 2]

1. tokens/s of greedy decoding (batch 1, short prompt) through eval/generation.py (prefill, then one
   `model.step` per token) and through transformers' `generate()` on the same weights exported with
   models/hf/export.py, for every family that exports to a native transformers class (xLSTM now; Mamba /
   Mamba-2 once their maps are in `FAMILIES`). Both produce the same tokens (checked).
2. milliseconds per generated token after a prefill of 256 and of 2048 tokens, for every family (our path):
   flat for the recurrent families (a fixed-size state), growing for attention (its KV cache is read in full
   at every step).
Sizes are the configs/tiny ones; nothing is downloaded. CPU numbers only: GPU decoding is bench/kernels_gpu.py's.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.generation import generate_tokens, prefill, state_nbytes  # noqa: E402
from models import CausalLM, ModelConfig  # noqa: E402
from models.hf.export import FAMILIES, export_hf  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"
CONFIGS = {"attention": "transformer.yaml", "mlstm": "xlstm.yaml", "mamba": "mamba.yaml", "mamba2": "mamba2.yaml"}


def tiny_model(family: str, max_seq_len: int) -> CausalLM:
    raw = yaml.safe_load((TINY / CONFIGS[family]).read_text())["model"]
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(**{**raw, "max_seq_len": max_seq_len}))
    with torch.no_grad():  # gates off their input-independent init, so decoding exercises real paths
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def best_of(repeats: int, fn):
    """(fastest wall time, result): the minimum is the least disturbed by other load on a shared CPU."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def ours_vs_transformers(family: str, new_tokens: int) -> str:
    from transformers import AutoModelForCausalLM

    model = tiny_model(family, 2048)
    with tempfile.TemporaryDirectory() as tmp:
        hf = AutoModelForCausalLM.from_pretrained(export_hf(model, tmp)).eval()
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 16))
    generate_tokens(model, prompt, 4)  # warm-up both paths
    hf.generate(prompt, max_new_tokens=4, do_sample=False)
    t_ours, ours = best_of(3, lambda: generate_tokens(model, prompt, new_tokens)[0])
    with torch.no_grad():
        t_hf, theirs = best_of(3, lambda: hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                      do_sample=False, eos_token_id=None, pad_token_id=0)[0, 16:].tolist())
    same = "same tokens" if ours == theirs else "TOKENS DIFFER"
    return (f"{family:10s} ours {new_tokens / t_ours:8.1f} tok/s   transformers {new_tokens / t_hf:8.1f} tok/s   "
            f"ratio {t_hf / t_ours:5.2f}x   ({same}, {type(hf).__name__})")


def ms_per_token(model: CausalLM, context: int, steps: int) -> tuple[float, int]:
    ids = torch.randint(0, model.cfg.vocab_size, (1, context))
    logits, state = prefill(model, ids, chunk_size=256)
    token = logits.argmax(-1)
    with torch.no_grad():
        for _ in range(3):  # warm-up at this context length; the state grows by 3 entries for attention
            logits, state = model.step(token, state)
        times = []
        for _ in range(steps):  # per-step minimum: robust to other load on a shared CPU
            start = time.perf_counter()
            logits, state = model.step(logits.argmax(-1), state)
            times.append(time.perf_counter() - start)
    return 1000 * min(times), state_nbytes(state)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--contexts", default="256,2048")
    parser.add_argument("--steps", type=int, default=32, help="timed decoding steps per context length (minimum reported)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, greedy, fp32\n")

    print(f"1. greedy generation, {args.new_tokens} new tokens after a 16-token prompt")
    for family in CONFIGS:
        if family in FAMILIES:
            print("  " + ours_vs_transformers(family, args.new_tokens))
        else:
            print(f"  {family:10s} (no native transformers export yet: skipped)")

    print(f"\n2. ms per generated token (our step path) after a prefill of {contexts} tokens")
    print("  family      " + "".join(f"{'ctx ' + str(c):>14s}" for c in contexts) + "   ratio   state bytes")
    for family in CONFIGS:
        model = tiny_model(family, max(contexts) + args.steps + 8)
        rows = [ms_per_token(model, c, args.steps) for c in contexts]
        ratio = rows[-1][0] / rows[0][0]
        sizes = " -> ".join(str(b) for _, b in rows)
        print(f"  {family:10s}" + "".join(f"{ms:12.3f}ms" for ms, _ in rows) + f"   {ratio:5.2f}x  {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
