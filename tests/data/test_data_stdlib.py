"""The python-stdlib demo corpus, the tokenizer trained on it, and the prepare_data CLI."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from data import TrainBatches, prepare, read_manifest, stdlib_corpus


def test_corpus_is_deterministic_and_ordered(tmp_path):
    a = stdlib_corpus.write_jsonl(tmp_path / "a.jsonl", max_bytes=300_000)
    stdlib_corpus.write_jsonl(tmp_path / "b.jsonl", max_bytes=300_000)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert 0 < a["text_bytes"] <= 300_000
    docs = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(docs) == a["documents"]
    sources = [d["source"] for d in docs]
    topics = [s for s in sources if s.startswith("pydoc_data/topics.py#")]
    assert topics and sources[: len(topics)] == sorted(topics)  # the pydoc topics (prose) come first
    files = stdlib_corpus.stdlib_files()
    assert files and all("site-packages" not in p.parts and "test" not in p.parts for p in files)
    rel = [p.relative_to(stdlib_corpus.stdlib_root()).as_posix() for p in files]
    assert rel == sorted(rel)
    capped = stdlib_corpus.write_jsonl(tmp_path / "c.jsonl", max_documents=3)
    assert capped["documents"] == 3


def test_stdlib_source_prepares_in_seconds(tmp_path, make_cfg):
    cfg = make_cfg(tmp_path / "s", ["python-stdlib"], vocab_size=1024, max_text_bytes=1_000_000,
                   seq_len=256, min_len=16, micro_batch_size=4, tokens_per_step=2048, holdout_fraction=0.02)
    t0 = time.perf_counter()
    m = prepare(cfg, progress=False)
    assert time.perf_counter() - t0 < 30
    assert (tmp_path / "s" / "python-stdlib.jsonl").is_file()
    assert m.vocab_size == 1024 and m.splits["train"].num_tokens > 100_000
    assert m.sources[0]["source"] == "python-stdlib" and "listing_sha256" in m.sources[0]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "s" / "tokenizer.json"))
    text = "def add(a, b):\n    return a + b  # größer\n"
    assert tok.decode(tok.encode(text).ids) == text  # byte-level: any text round-trips
    assert len(tok.encode(text).ids) < 0.6 * len(text.encode())  # and the merges learned Python
    tb = TrainBatches(cfg, dp_rank=0, dp_size=1, seed=0)
    assert len(tb.next_step()) == 2


def test_prepare_data_cli(tmp_path, write_jsonl, random_texts, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "prepare_data_cli", Path(__file__).resolve().parents[2] / "launch" / "prepare_data.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)

    src = write_jsonl(tmp_path / "a.jsonl", random_texts(30, seed=12))
    run = {"model": {"d_model": 64}, "data": {"sources": [src], "shards_dir": str(tmp_path / "s"), "seq_len": 64,
                                               "min_len": 8, "micro_batch_size": 2, "tokens_per_step": 256,
                                               "vocab_size": 300}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    cli.main(["--config", str(tmp_path / "run.yaml"), "--set", "data.max_documents=10", "--set", "model.x=1",
              "--quiet"])
    assert read_manifest(tmp_path / "s").splits["train"].num_documents == 10
    assert "ignoring --set model.x" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="tokens_per_step"):
        cli.main(["--config", str(tmp_path / "run.yaml"), "--set", "data.tokens_per_step=100"])
    with pytest.raises(SystemExit, match="data error: .*does not exist"):
        cli.main(["--config", str(tmp_path / "run.yaml"), "--set", "data.sources=[missing.jsonl]"])
