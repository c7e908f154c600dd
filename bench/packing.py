"""Packed documents against decomposition and padding, on the python-stdlib corpus (CPU, a few minutes).

    python bench/packing.py [--max-bytes 1000000] [--seq-len 256] [--steps 6]

Prints, for one corpus and one token budget per step:

1. the share of real tokens: of the positions a step computes, how many are corpus tokens (not padding),
   and of the corpus, how many tokens an epoch trains on (not dropped), for dataset decomposition, packed
   concat rows (data.mode=concat, data.separate_documents) and one document per row, truncated to
   seq_len and padded (the layout packing replaces);
2. training tokens/s (real tokens, forward + backward, tiny transformer and tiny Mamba-2 in fp32, the
   three layouts interleaved step by step);
3. peak memory of packed attention on the CPU at T = 2048, 4096, 8192 (one subprocess per point, peak
   resident memory above the inputs'): per-document SDPA (mixer_kernels/attention/reference.py
   packed_attention_ref) against the dense (T, T) document mask it replaced. Quadratic growth shows as 4x
   per doubling, linear as 2x.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from data import DataConfig, TrainBatches, prepare, stdlib_corpus  # noqa: E402
from data.shards import open_split  # noqa: E402
from data.tokenizer import train_bpe  # noqa: E402
from models import CausalLM, ModelConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def padded_batches(docs: list[np.ndarray], seq_len: int, rows: int):
    """One document per row, truncated to seq_len, padded with label -100: (input_ids, labels) per step."""
    for i in range(0, len(docs) - rows + 1, rows):
        ids = torch.zeros(rows, seq_len, dtype=torch.long)
        labels = torch.full((rows, seq_len), -100)
        for r, doc in enumerate(docs[i:i + rows]):
            doc = torch.from_numpy(doc[: seq_len + 1].astype(np.int64))
            ids[r, : len(doc) - 1], labels[r, : len(doc) - 1] = doc[:-1], doc[1:]
        yield {"input_ids": ids, "labels": labels}


def real_tokens(batch: dict) -> int:
    return int((batch["labels"] != -100).sum())


def step_time(model: CausalLM, batch: dict) -> float:
    t0 = time.perf_counter()
    model(batch["input_ids"], labels=batch["labels"], cu_seqlens=batch.get("cu_seqlens")).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def attention_peak(kind: str, t: int) -> None:
    """Child process: peak memory (MiB) of one packed attention forward over T tokens in 4 documents."""
    from mixer_kernels.attention.reference import attention_ref, packed_attention_ref

    torch.manual_seed(0)
    q, k, v = (torch.randn(t, 4, 64) for _ in range(3))
    cu = torch.tensor([0, t // 8, t // 4, t // 2, t])
    base = peak_rss_mib()
    if kind == "per-document":
        packed_attention_ref(q, k, v, cu)
    else:  # the dense document mask
        attention_ref(*(x.transpose(0, 1)[None] for x in (q, k, v)), cu_seqlens=cu)
    print(peak_rss_mib() - base)


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it does not carry the parent's over exec)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-bytes", type=int, default=1_000_000, help="cap on the stdlib corpus (UTF-8 bytes)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rows", type=int, default=8, help="rows per step (tokens per step = rows * seq-len)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per layout and model")
    p.add_argument("--attention-peak", nargs=2, metavar=("KIND", "T"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.attention_peak:
        return attention_peak(args.attention_peak[0], int(args.attention_peak[1]))
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        jsonl = tmp / "stdlib.jsonl"
        stdlib_corpus.write_jsonl(jsonl, max_bytes=args.max_bytes)
        texts = [json.loads(line)["text"] for line in jsonl.read_text().splitlines()]
        tok_path = tmp / "tokenizer.json"
        train_bpe([texts], 2048, "<|endoftext|>").save(str(tok_path))
        common = dict(sources=[str(jsonl)], tokenizer=str(tok_path), shards_dir=str(tmp / "shards"),
                      seq_len=args.seq_len, min_len=16, micro_batch_size=args.rows,
                      tokens_per_step=args.rows * args.seq_len, holdout_fraction=0.0, vocab_size=2048)
        prepare(DataConfig(**common), progress=False)
        shards = open_split(tmp / "shards")
        docs = list(shards.iter_documents())
        corpus = sum(len(d) - 1 for d in docs)  # label tokens: each document's tokens after its first

        layouts = {
            "decomposition": TrainBatches(DataConfig(**common, mode="decompose", curriculum="natural"),
                                          dp_rank=0, dp_size=1, seed=0),
            "packed concat": TrainBatches(DataConfig(**common, mode="concat", separate_documents=True),
                                          dp_rank=0, dp_size=1, seed=0),
        }
        batches = {name: [b for _ in range(tb.steps_per_epoch) for b in tb.next_step()]
                   for name, tb in layouts.items()}
        batches["padded, 1 doc/row"] = list(padded_batches(docs, args.seq_len, args.rows))

        print(f"corpus: python-stdlib, {len(docs)} documents, {corpus:,} tokens; steps of {args.rows} x "
              f"{args.seq_len} positions")
        print("\n== share of real tokens over one epoch")
        print(f"{'layout':<20} {'real / computed':>16} {'trained / corpus':>17}")
        for name, bs in batches.items():
            real = sum(real_tokens(b) for b in bs)
            computed = sum(b["labels"].numel() for b in bs)
            print(f"{name:<20} {real / computed:>16.1%} {real / corpus:>17.1%}")

        print(f"\n== training tokens/s (real tokens, fwd + bwd, fp32, {args.steps} steps each, interleaved)")
        print(f"{'model':<12} " + " ".join(f"{name:>20}" for name in batches) + f" {'packed / padded':>16}")
        for family in ("transformer", "mamba2"):
            cfg = yaml.safe_load((ROOT / "configs" / "tiny" / f"{family}.yaml").read_text())["model"]
            model = CausalLM(ModelConfig(**cfg | {"max_seq_len": max(cfg["max_seq_len"], args.seq_len)}))
            seconds, tokens = dict.fromkeys(batches, 0.0), dict.fromkeys(batches, 0)
            for name in batches:  # warm-up
                step_time(model, batches[name][0])
            for i in range(args.steps):
                for name, bs in batches.items():
                    batch = bs[(i + 1) % len(bs)]
                    seconds[name] += step_time(model, batch)
                    tokens[name] += real_tokens(batch)
            rate = {name: tokens[name] / seconds[name] for name in batches}
            print(f"{family:<12} " + " ".join(f"{rate[name]:>20,.0f}" for name in batches)
                  + f" {rate['packed concat'] / rate['padded, 1 doc/row']:>15.2f}x")

    print("\n== packed attention on the CPU: peak memory over the inputs (MiB), 4 documents, 4 heads of 64")
    print(f"{'T':>6} {'per-document SDPA':>18} {'dense (T, T) mask':>18}")
    for t in (2048, 4096, 8192):
        peaks = [float(subprocess.run([sys.executable, __file__, "--attention-peak", kind, str(t)], check=True,
                                      capture_output=True, text=True).stdout)
                 for kind in ("per-document", "dense")]
        print(f"{t:>6} {peaks[0]:>18.0f} {peaks[1]:>18.0f}")
    print("goal: per-document grows ~2x per doubling of T (linear), the dense mask ~4x")


if __name__ == "__main__":
    main()
