"""prepare(): shards and manifest contents, the no-op re-run, atomic writes, every source format."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from tokenizers import Tokenizer

from data import DataError, TrainBatches, open_split, prepare, read_manifest
from data.manifest import sha256_file
from data.shards import ShardWriter


def decode_docs(shards_dir, split="train"):
    tok = Tokenizer.from_file(os.path.join(shards_dir, "tokenizer.json"))
    m = read_manifest(shards_dir)
    out = []
    for doc in open_split(shards_dir, split).iter_documents():
        assert doc[-1] == m.eos_id and (doc[:-1] != m.eos_id).all()
        out.append(tok.decode(doc[:-1].tolist()))
    return out


def file_times(d):
    return {p: os.stat(os.path.join(d, p)).st_mtime_ns for p in sorted(os.listdir(d))}


def test_manifest_and_shards(tmp_path, make_cfg, random_texts, write_jsonl):
    texts = random_texts(60, seed=2)
    cfg = make_cfg(tmp_path / "s", [write_jsonl(tmp_path / "a.jsonl", texts)], tokens_per_shard=1024)
    m = prepare(cfg, progress=False)
    assert m.dtype == "uint16" and m.vocab_size <= 300 and m.eos_id == 0
    assert m.tokenizer_sha256 == sha256_file(tmp_path / "s" / "tokenizer.json")
    train = m.splits["train"]
    assert len(train.shards) > 1 and train.num_documents == 60
    for sf in train.shards:
        assert sha256_file(tmp_path / "s" / sf.tokens_file) == sf.tokens_sha256
        assert sha256_file(tmp_path / "s" / sf.offsets_file) == sf.offsets_sha256
        tokens = np.fromfile(tmp_path / "s" / sf.tokens_file, dtype=np.uint16)
        assert len(tokens) == sf.num_tokens and tokens[0] == m.eos_id  # the leading EOS
    assert decode_docs(tmp_path / "s") == texts  # every document, in order, split across shards intact
    report = json.loads((tmp_path / "s" / "decomposition.json").read_text())
    assert report["kept_tokens"] + report["dropped_tokens"] == train.num_tokens


def test_rerun_is_a_noop_and_changes_rebuild(tmp_path, make_cfg, random_texts, write_jsonl, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", random_texts(30, seed=3))
    cfg = make_cfg(tmp_path / "s", [src])
    first = prepare(cfg, progress=False)
    before = file_times(tmp_path / "s")
    capsys.readouterr()
    again = prepare(cfg, progress=False)
    assert "up to date" in capsys.readouterr().out
    assert again == first and file_times(tmp_path / "s") == before  # nothing rewritten
    # settings that only change batching do not re-tokenize
    prepare(cfg.model_copy(update={"seq_len": 32}), progress=False)
    assert "up to date" in capsys.readouterr().out
    # a changed source does
    write_jsonl(src, random_texts(31, seed=3))
    third = prepare(cfg, progress=False)
    assert "up to date" not in capsys.readouterr().out
    assert third.fingerprint != first.fingerprint and third.splits["train"].num_documents == 31


def test_given_tokenizer_and_streaming_give_the_same_shards(tmp_path, make_cfg, random_texts, write_jsonl):
    src = write_jsonl(tmp_path / "a.jsonl", random_texts(50, seed=4))
    a = prepare(make_cfg(tmp_path / "a", [src]), progress=False)
    tok = str(tmp_path / "a" / "tokenizer.json")
    b = prepare(make_cfg(tmp_path / "b", [src], tokenizer=tok, streaming=True, num_proc=2), progress=False)
    assert [s.tokens_sha256 for s in a.splits["train"].shards] == [s.tokens_sha256 for s in b.splits["train"].shards]
    assert a.tokenizer_sha256 == b.tokenizer_sha256


def test_all_local_formats(tmp_path, make_cfg, random_texts, write_jsonl):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = random_texts(12, seed=5)
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    for i, t in enumerate(texts[:4]):
        (d / "sub" / f"{i}.txt").write_text(t)
    write_jsonl(d / "b.jsonl", texts[4:8], field="body")
    pq.write_table(pa.table({"body": texts[8:], "n": list(range(4))}), d / "c.parquet")
    (d / "d.json").write_text(json.dumps([{"body": "a json array document"}]))
    cfg = make_cfg(tmp_path / "s", [str(d / "sub" / "*.txt"), d / "b.jsonl", d / "c.parquet", d / "d.json"],
                   text_field="body")
    prepare(cfg, progress=False)
    assert decode_docs(tmp_path / "s") == texts + ["a json array document"]
    # a directory source reads every supported file below it, sorted by path
    cfg = make_cfg(tmp_path / "s2", [d], text_field="body", tokenizer=str(tmp_path / "s" / "tokenizer.json"))
    assert prepare(cfg, progress=False).splits["train"].num_documents == 13


def test_txt_paragraphs_and_lines(tmp_path, make_cfg):
    (tmp_path / "a.txt").write_text("first para\nstill first\n\nsecond para\n")
    m = prepare(make_cfg(tmp_path / "p", [tmp_path / "a.txt"], txt_document="paragraph"), progress=False)
    assert m.splits["train"].num_documents == 2
    m = prepare(make_cfg(tmp_path / "l", [tmp_path / "a.txt"], txt_document="line"), progress=False)
    assert m.splits["train"].num_documents == 3 and m.empty_documents_skipped == 1


def test_caps_holdout_and_special_token_text(tmp_path, make_cfg, random_texts, write_jsonl):
    texts = ["x <|endoftext|> y"] + random_texts(199, seed=6)
    src = write_jsonl(tmp_path / "a.jsonl", texts)
    m = prepare(make_cfg(tmp_path / "s", [src], holdout_fraction=0.25), progress=False)
    n_train, n_val = m.splits["train"].num_documents, m.splits["val"].num_documents
    assert n_train + n_val == 200 and 25 < n_val < 75
    assert sorted(decode_docs(tmp_path / "s") + decode_docs(tmp_path / "s", "val")) == sorted(texts)
    # the held-out documents are the same on every run
    m2 = prepare(make_cfg(tmp_path / "s2", [src], holdout_fraction=0.25), progress=False)
    assert m2.splits["val"].shards[0].tokens_sha256 == m.splits["val"].shards[0].tokens_sha256
    m = prepare(make_cfg(tmp_path / "c", [src], max_documents=10), progress=False)
    assert m.splits["train"].num_documents == 10
    cap = sum(len(t.encode()) for t in texts[:7])
    m = prepare(make_cfg(tmp_path / "b", [src], max_text_bytes=cap), progress=False)
    assert m.splits["train"].num_documents == 7 and m.text_bytes == cap


def test_failed_prepare_leaves_nothing_that_looks_complete(tmp_path, make_cfg, random_texts, write_jsonl,
                                                           monkeypatch):
    src = write_jsonl(tmp_path / "a.jsonl", random_texts(40, seed=7))
    cfg = make_cfg(tmp_path / "s", [src], tokens_per_shard=1024)
    calls = {"n": 0}
    real_add = ShardWriter.add

    def dying_add(self, doc):
        calls["n"] += 1
        if calls["n"] == 25:
            raise KeyboardInterrupt  # as if killed mid-way
        real_add(self, doc)

    monkeypatch.setattr(ShardWriter, "add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, progress=False)
    assert sorted(os.listdir(tmp_path / "s")) == []  # no manifest, no shard, no temp folder
    with pytest.raises(DataError, match="no manifest.json"):
        TrainBatches(cfg, dp_rank=0, dp_size=1, seed=0)
    monkeypatch.undo()
    # a temp folder left by a SIGKILLed run is cleaned by the next run
    (tmp_path / "s" / ".prepare-tmp-999").mkdir()
    (tmp_path / "s" / ".prepare-tmp-999" / "train_00000.bin").write_bytes(b"junk")
    good = prepare(cfg, progress=False)
    assert not any(p.startswith(".prepare-tmp") for p in os.listdir(tmp_path / "s"))
    # a re-preparation killed mid-way leaves the previous complete shards untouched
    write_jsonl(src, random_texts(45, seed=7))
    calls["n"] = 0
    monkeypatch.setattr(ShardWriter, "add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, progress=False)
    assert read_manifest(tmp_path / "s") == good
    TrainBatches(cfg, dp_rank=0, dp_size=1, seed=0).next_step()  # checksums still match


def test_reprepare_removes_stale_shards(tmp_path, make_cfg, random_texts, write_jsonl):
    src = write_jsonl(tmp_path / "a.jsonl", random_texts(60, seed=8))
    big = prepare(make_cfg(tmp_path / "s", [src], tokens_per_shard=1024), progress=False)
    small = prepare(make_cfg(tmp_path / "s", [src], tokens_per_shard=1 << 20), progress=False)
    assert len(big.splits["train"].shards) > 1 and len(small.splits["train"].shards) == 1
    assert sorted(p for p in os.listdir(tmp_path / "s") if p.startswith("train_")) == [
        "train_00000.bin", "train_00000.offsets.npy"]
