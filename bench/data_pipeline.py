"""Benchmark of the data path on the python-stdlib corpus (CPU, under a minute).

    python bench/data_pipeline.py [--max-bytes 4000000] [--seq-len 8192]

Prints, on one corpus:

1. preparation throughput (tokens/s): our `prepare` (datasets load, tokenizers'
   Rust batch encode, EOS per document, shards + sha256 + manifest) against a
   plain baseline (datasets `map` with the same tokenizer's batch encode, then
   one `np.concatenate`), each with a fresh datasets cache, and their ratio;
2. padding tokens per step over a whole epoch of `TrainBatches` (should be 0);
3. attention FLOPs per token under dataset decomposition (natural curriculum,
   buckets 256..seq_len) against concat-and-chunk at seq_len. Causal attention
   over a sequence of length t costs ~ t^2 (times layers and width, which
   cancel), so ~ t per token; per-token cost is averaged over the steps of the
   epoch (every step has the same tokens) and, as a check, over the buckets'
   token shares.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import datasets  # noqa: E402
import numpy as np  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from data import DataConfig, TrainBatches, prepare, stdlib_corpus  # noqa: E402
from data.tokenizer import train_bpe  # noqa: E402


def baseline_tokens_per_s(jsonl: Path, tokenizer: Path, eos: int, cache: Path) -> tuple[int, float]:
    """A plain datasets.map tokenize + concatenate, as most training scripts do it."""
    tok = Tokenizer.from_file(str(tokenizer))
    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(jsonl), split="train", cache_dir=str(cache))
    ds = ds.map(lambda b: {"ids": [e.ids + [eos] for e in tok.encode_batch(b["text"])]},
                batched=True, remove_columns=ds.column_names)
    tokens = np.concatenate([np.asarray(ids, dtype=np.uint16) for ids in ds["ids"]])
    return len(tokens), time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-bytes", type=int, default=4_000_000, help="cap on the stdlib corpus (UTF-8 bytes)")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--min-len", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=2048)
    args = p.parse_args()
    datasets.disable_progress_bars()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        jsonl = tmp / "stdlib.jsonl"
        st = stdlib_corpus.write_jsonl(jsonl, max_bytes=args.max_bytes)
        print(f"corpus: python-stdlib, {st['documents']} documents, {st['text_bytes'] / 1e6:.1f} MB")
        texts = [json.loads(line)["text"] for line in jsonl.read_text().splitlines()]
        tok = train_bpe([texts], args.vocab_size, "<|endoftext|>")
        tok_path = tmp / "tokenizer.json"
        tok.save(str(tok_path))

        # 1. preparation throughput, each path with a cold datasets cache
        base_tokens, base_s = baseline_tokens_per_s(jsonl, tok_path, 0, tmp / "cache_baseline")
        datasets.config.HF_DATASETS_CACHE = tmp / "cache_ours"
        tokens_per_step = args.seq_len * 8
        cfg = DataConfig(sources=[str(jsonl)], tokenizer=str(tok_path), shards_dir=str(tmp / "shards"),
                         seq_len=args.seq_len, min_len=args.min_len, micro_batch_size=8,
                         tokens_per_step=tokens_per_step, curriculum="natural")
        t0 = time.perf_counter()
        m = prepare(cfg, progress=False)
        ours_s = time.perf_counter() - t0
        ours_tokens = m.splits["train"].num_tokens + m.splits["val"].num_tokens
        assert ours_tokens == base_tokens, (ours_tokens, base_tokens)
        print("\n== preparation throughput (same corpus, same tokenizer, cold datasets cache)")
        print(f"ours (prepare: load, batch encode, shards + sha256 + manifest): {ours_tokens / ours_s:12,.0f} tokens/s")
        print(f"baseline (datasets.map tokenize + np.concatenate):              {base_tokens / base_s:12,.0f} tokens/s")
        print(f"ratio ours / baseline: {base_s / ours_s:.2f}x  ({os.cpu_count()} CPU cores)")

        # 2. padding per step, and 3. attention cost, over one epoch of the natural curriculum
        tb = TrainBatches(cfg, dp_rank=0, dp_size=1, seed=0)
        padding, lengths = [], []
        for _ in range(tb.steps_per_epoch):
            micro = tb.next_step()
            real = sum(mb["labels"].numel() for mb in micro)  # every position is a corpus token
            padding.append(tokens_per_step - real)
            lengths.append(micro[0]["input_ids"].shape[1])
        print(f"\n== padding over one epoch ({tb.steps_per_epoch} steps of {tokens_per_step:,} tokens)")
        print(f"padding tokens per step: max {max(padding)}, total {sum(padding)}")

        share = np.array([len(b) * b.length for b in tb.buckets], dtype=float)
        share /= share.sum()
        by_bucket = float(sum(s * b.length for s, b in zip(share, tb.buckets)))
        per_token_dd = float(np.mean(lengths))
        print(f"\n== attention FLOPs per token (~ sequence length t), decomposition vs concat at {args.seq_len}")
        print("bucket mix (natural): " + ", ".join(f"{b.length}: {s:.1%}" for s, b in zip(share, tb.buckets)))
        print(f"decomposition: mean t over the epoch's steps {per_token_dd:,.0f} (by bucket token share {by_bucket:,.0f})")
        print(f"concat-and-chunk: t = {args.seq_len:,}")
        print(f"ratio decomposition / concat: {per_token_dd / args.seq_len:.3f} "
              f"({args.seq_len / per_token_dd:.1f}x less attention compute per token)")


if __name__ == "__main__":
    main()
