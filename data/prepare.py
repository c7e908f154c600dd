"""`prepare(cfg)`: sources -> tokenizer -> token shards + manifest.json, done once.

Steps: resolve the sources (missing files stop here); fingerprint every input
(file sizes and mtimes, the stdlib listing, the tokenizer file's sha256 or the
training settings, the settings that shape the shards); if `manifest.json`
has that fingerprint and its files are in place, say so and stop. Otherwise
build everything in a temp folder inside `shards_dir`: the stdlib JSONL when
asked for, the UTF-8 check, the tokenizer (copied, or trained on the first
`tokenizer_train_bytes` of text), and the shards (tokenizers' Rust batch encode
on `num_proc` threads, EOS appended per document, a tqdm bar and tokens/s).
Then commit: delete the old manifest, move the new files in, and write the
new manifest last by atomic rename. A run killed at any point leaves either
the old complete folder or one without a manifest, which reads as unprepared;
leftover temp folders are removed by the next run.

Call it on one process (rank 0) before training starts. It also writes
`decomposition.json`: tokens and sequences per bucket, dropped tokens and steps
per epoch for the config's seq_len / min_len / tokens_per_step (a report only:
`TrainBatches` recomputes the buckets from the shards).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .config import DataConfig
from .decompose import bucket_report, build_buckets
from .errors import DataError
from .manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    TOKENIZER_NAME,
    Manifest,
    SplitInfo,
    read_manifest,
    sha256_file,
    write_json_atomic,
)
from .shards import ShardWriter, read_offsets
from .sources import (
    TEXT_FORMATS,
    ReadStats,
    Source,
    check_text_field,
    describe_sources,
    first_bad_utf8,
    iter_text_batches,
    plan_units,
    resolve_sources,
    write_replaced_copy,
)
from .tokenizer import eos_id, load_tokenizer, token_dtype, train_bpe, vocab_limit

TMP_PREFIX = ".prepare-tmp-"
STDLIB_JSONL = "python-stdlib.jsonl"
DECOMPOSITION_NAME = "decomposition.json"
SHARD_FILE = re.compile(r"^(train|val)_\d{5}\.(bin|offsets\.npy)$")


def prepare(cfg: DataConfig, *, progress: bool = True) -> Manifest:
    """Tokenize `cfg.sources` into `cfg.shards_dir` unless it already holds exactly that; return the manifest."""
    out = Path(cfg.shards_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources = resolve_sources(cfg)
    inputs = _inputs(cfg, sources)
    fingerprint = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()

    existing = _up_to_date(out, fingerprint)
    if existing is not None:
        print(f"data: {out} is up to date (fingerprint {fingerprint[:12]}): same sources, tokenizer and settings; "
              f"nothing to prepare")
        _write_decomposition(cfg, existing)
        return existing

    for stale in out.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed run
    tmp = out / f"{TMP_PREFIX}{os.getpid()}"
    tmp.mkdir()
    import datasets  # here, not at the top: `import data` stays light for the training processes

    bars = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        manifest = _build(cfg, sources, inputs, fingerprint, tmp, progress)
        _commit(out, tmp, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if bars:
            datasets.enable_progress_bars()
    _write_decomposition(cfg, manifest)
    return manifest


def _inputs(cfg: DataConfig, sources: list[Source]) -> dict:
    """Everything the shards depend on (and nothing they don't, e.g. num_proc or streaming)."""
    if cfg.tokenizer is not None:
        load_tokenizer(cfg.tokenizer)  # fails early, with a clear message, on a bad path or file
        tokenizer = {"file_sha256": sha256_file(cfg.tokenizer)}
    else:
        tokenizer = {"train_bpe": {"vocab_size": cfg.vocab_size, "train_bytes": cfg.tokenizer_train_bytes}}
    settings = cfg.model_dump(
        include={"text_field", "txt_document", "max_documents", "max_text_bytes", "on_bad_utf8",
                 "on_empty_document", "eos_token", "tokens_per_shard", "holdout_fraction"}
    )
    return {"format_version": FORMAT_VERSION, "sources": describe_sources(sources), "tokenizer": tokenizer,
            "settings": settings}


def _up_to_date(out: Path, fingerprint: str) -> Manifest | None:
    try:
        m = read_manifest(out)
    except DataError:
        return None
    if m.fingerprint != fingerprint:
        return None
    itemsize = np.dtype(m.dtype).itemsize
    for split in m.splits.values():
        for sf in split.shards:
            tokens = out / sf.tokens_file
            if not tokens.is_file() or tokens.stat().st_size != sf.num_tokens * itemsize:
                return None
            if not (out / sf.offsets_file).is_file():
                return None
    tok = out / m.tokenizer_file
    return m if tok.is_file() and sha256_file(tok) == m.tokenizer_sha256 else None


def _check_utf8(cfg: DataConfig, sources: list[Source], tmp: Path) -> dict[Path, Path]:
    """Scan local text files; return {bad file: cleaned copy} under 'replace', raise under 'error'."""
    replaced: dict[Path, Path] = {}
    for s in sources:
        for p in s.files:
            if p.suffix not in TEXT_FORMATS:
                continue
            offset = first_bad_utf8(p)
            if offset is None:
                continue
            if cfg.on_bad_utf8 == "error":
                raise DataError(
                    f"{p}: byte {offset} is not valid UTF-8; convert the file to UTF-8 (e.g. with iconv), or set "
                    f"data.on_bad_utf8=replace to read bad bytes as U+FFFD"
                )
            copy = tmp / "utf8-replaced" / f"{len(replaced):05d}{p.suffix}"
            copy.parent.mkdir(exist_ok=True)
            write_replaced_copy(p, copy)
            replaced[p] = copy
    return replaced


def _held_out(indices: np.ndarray, fraction: float) -> np.ndarray:
    """Whether each document index goes to 'val': a splitmix64 hash of the index below `fraction`."""
    if fraction <= 0:
        return np.zeros(len(indices), dtype=bool)
    z = indices.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def _build(cfg: DataConfig, sources: list[Source], inputs: dict, fingerprint: str, tmp: Path,
           progress: bool) -> Manifest:
    from . import stdlib_corpus  # imported here so `python -m data.stdlib_corpus` runs it fresh

    stdlib_jsonl = None
    if any(s.kind == "stdlib" for s in sources):
        stdlib_jsonl = tmp / STDLIB_JSONL
        st = stdlib_corpus.write_jsonl(stdlib_jsonl, max_documents=cfg.max_documents, max_bytes=cfg.max_text_bytes)
        print(f"data: python-stdlib corpus from {stdlib_corpus.stdlib_root()}: {st['documents']} documents, "
              f"{st['text_bytes'] / 1e6:.1f} MB (skipped {st['skipped_not_utf8']} non-UTF-8 and "
              f"{st['skipped_empty']} empty files)")
    replaced = _check_utf8(cfg, sources, tmp)
    for s in sources:
        for p in s.files:
            check_text_field(p, cfg.text_field)
    units = plan_units(sources, stdlib_jsonl, replaced)
    empty_files = [str(p) for s in sources for p in s.files if p.stat().st_size == 0]
    if empty_files:
        print(f"data: {len(empty_files)} source files are empty (0 bytes), e.g. {empty_files[0]}")

    # tokenizers' Rust thread pool reads this when it starts (the first parallel call in this process).
    if cfg.num_proc:
        os.environ.setdefault("RAYON_NUM_THREADS", str(cfg.num_proc))
    if cfg.tokenizer is None:
        t0 = time.perf_counter()
        tok = train_bpe(
            iter_text_batches(units, cfg, ReadStats(), max_bytes=cfg.tokenizer_train_bytes),
            cfg.vocab_size,
            cfg.eos_token,
        )
        tok.save(str(tmp / TOKENIZER_NAME))
        print(f"data: trained a byte-level BPE of {tok.get_vocab_size()} tokens in {time.perf_counter() - t0:.1f}s")
        where = "trained here"
    else:
        shutil.copyfile(cfg.tokenizer, tmp / TOKENIZER_NAME)
        tok = load_tokenizer(tmp / TOKENIZER_NAME)
        where = cfg.tokenizer
    eos = eos_id(tok, cfg.eos_token, where)
    vocab = vocab_limit(tok)
    dtype = token_dtype(vocab)
    tok.encode_special_tokens = True  # a document that spells "<|endoftext|>" stays text: EOS only ends documents

    writers = {s: ShardWriter(tmp, s, dtype, eos, cfg.tokens_per_shard) for s in ("train", "val")}
    stats = ReadStats()
    n_tokens = 0
    t0 = time.perf_counter()
    bar = tqdm(desc="data: tokenizing", unit=" docs", disable=not progress, mininterval=1.0)
    for texts in iter_text_batches(units, cfg, stats):
        held = _held_out(np.arange(stats.documents - len(texts), stats.documents), cfg.holdout_fraction)
        for enc, h in zip(tok.encode_batch_fast(texts, add_special_tokens=False), held):
            ids = np.empty(len(enc.ids) + 1, dtype=dtype)
            ids[:-1] = enc.ids
            ids[-1] = eos
            writers["val" if h else "train"].add(ids)
            n_tokens += len(ids)
        bar.update(len(texts))
        bar.set_postfix(tokens=n_tokens, tok_per_s=f"{n_tokens / (time.perf_counter() - t0):,.0f}", refresh=False)
    bar.close()
    seconds = time.perf_counter() - t0

    if stats.documents == 0:
        raise DataError(
            f"data.sources {cfg.sources} hold no non-empty document ({stats.empty_skipped} empty ones skipped); "
            f"check the files and data.text_field={cfg.text_field!r}"
        )
    splits = {}
    for name, w in writers.items():
        shards = w.close()
        splits[name] = SplitInfo(
            num_documents=sum(s.num_documents for s in shards),
            num_tokens=sum(s.num_tokens - 1 for s in shards),
            shards=shards,
        )
    if splits["train"].num_documents == 0:
        raise DataError(
            f"data.holdout_fraction={cfg.holdout_fraction} sent all {stats.documents} documents to 'val'; "
            f"lower it or add data"
        )
    print(f"data: tokenized {stats.documents} documents ({stats.text_bytes / 1e6:.1f} MB) into {n_tokens:,} tokens "
          f"in {seconds:.2f}s: {n_tokens / max(seconds, 1e-9):,.0f} tokens/s; train {splits['train'].num_tokens:,}, "
          f"val {splits['val'].num_tokens:,} tokens; {stats.empty_skipped} empty documents skipped")
    return Manifest(
        fingerprint=fingerprint,
        dtype=dtype.name,
        vocab_size=vocab,
        eos_id=eos,
        eos_token=cfg.eos_token,
        tokenizer_sha256=sha256_file(tmp / TOKENIZER_NAME),
        splits=splits,
        text_bytes=stats.text_bytes,
        empty_documents_skipped=stats.empty_skipped,
        utf8_replaced_files=[str(p) for p in replaced],
        sources=inputs["sources"],
        settings={**inputs["settings"], "tokenizer": inputs["tokenizer"]},
    )


def _commit(out: Path, tmp: Path, manifest: Manifest) -> None:
    # From the unlink on, the folder reads as unprepared until the new manifest lands.
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    new = {TOKENIZER_NAME, STDLIB_JSONL}
    for split in manifest.splits.values():
        for sf in split.shards:
            new |= {sf.tokens_file, sf.offsets_file}
    for name in sorted(new):
        if (tmp / name).exists():
            os.replace(tmp / name, out / name)
    write_json_atomic(out / MANIFEST_NAME, manifest.model_dump())
    for p in out.iterdir():
        if SHARD_FILE.match(p.name) and p.name not in new:
            p.unlink()  # a shard of an earlier, larger preparation


def _write_decomposition(cfg: DataConfig, manifest: Manifest) -> None:
    out = Path(cfg.shards_dir)
    offsets = [read_offsets(out / sf.offsets_file, sf) for sf in manifest.splits["train"].shards]
    buckets, dropped = build_buckets(offsets, cfg.mode, cfg.seq_len, cfg.min_len)
    report = {
        "mode": cfg.mode,
        "seq_len": cfg.seq_len,
        "min_len": cfg.min_len if cfg.mode == "decompose" else None,
        "tokens_per_step": cfg.tokens_per_step,
        "train_tokens": manifest.splits["train"].num_tokens,
        **bucket_report(buckets, dropped, cfg.tokens_per_step),
    }
    path = out / DECOMPOSITION_NAME
    if path.is_file() and json.loads(path.read_text()) == report:
        return
    write_json_atomic(path, report)
    rows = ", ".join(f"{r['length']}: {r['sequences']}" for r in report["buckets"])
    print(f"data: {cfg.mode} at seq_len {cfg.seq_len}: sequences per length {{{rows}}}; "
          f"dropped {dropped:,} of {report['train_tokens']:,} tokens; {report['steps_per_epoch']} steps per epoch "
          f"of {cfg.tokens_per_step:,} tokens -> {path}")
