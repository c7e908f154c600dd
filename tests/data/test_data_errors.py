"""Bad data stops with a DataError that names the file or key and the fix, and writes nothing half-done."""

from __future__ import annotations

import os

import numpy as np
import pytest
from pydantic import ValidationError

from data import DataConfig, DataError, TrainBatches, check_vocab_fits, prepare, read_manifest


def no_manifest(d):
    return not os.path.exists(os.path.join(d, "manifest.json"))


def test_missing_file(tmp_path, make_cfg):
    with pytest.raises(DataError, match="nope.jsonl.*does not exist"):
        prepare(make_cfg(tmp_path / "s", [tmp_path / "nope.jsonl"]), progress=False)


def test_glob_matching_nothing(tmp_path, make_cfg):
    with pytest.raises(DataError, match=r"glob .*\*\.jsonl.* matches no"):
        prepare(make_cfg(tmp_path / "s", [str(tmp_path / "*.jsonl")]), progress=False)


def test_hub_source_syntax():
    from data.sources import _resolve_one

    assert _resolve_one("hf:owner/name:cfg@validation").hub == ("owner/name", "cfg", "validation")
    assert _resolve_one("hf:owner/name").hub == ("owner/name", None, "train")
    with pytest.raises(DataError, match="names no dataset"):
        _resolve_one("hf:")


def test_hub_source_offline_is_a_clear_error(tmp_path, make_cfg):
    with pytest.raises(DataError, match="hub dataset some-owner/some-dataset"):
        prepare(make_cfg(tmp_path / "s", ["hf:some-owner/some-dataset"], streaming=True), progress=False)
    assert no_manifest(tmp_path / "s")


def test_unknown_source_kind(tmp_path, make_cfg):
    with pytest.raises(DataError, match="hf:owner/name"):
        prepare(make_cfg(tmp_path / "s", ["some/dataset"]), progress=False)


@pytest.mark.parametrize("content", ["", '{"text": ""}\n{"text": ""}\n'])
def test_empty_corpus(tmp_path, make_cfg, content):
    (tmp_path / "a.jsonl").write_text(content)
    with pytest.raises(DataError, match="no non-empty document"):
        prepare(make_cfg(tmp_path / "s", [tmp_path / "a.jsonl"]), progress=False)
    assert no_manifest(tmp_path / "s")


def test_empty_document_policy(tmp_path, make_cfg, write_jsonl):
    src = write_jsonl(tmp_path / "a.jsonl", ["one doc", "", "two doc"])
    m = prepare(make_cfg(tmp_path / "s", [src]), progress=False)
    assert m.splits["train"].num_documents == 2 and m.empty_documents_skipped == 1
    with pytest.raises(DataError, match="record 1.*empty.*on_empty_document"):
        prepare(make_cfg(tmp_path / "e", [src], on_empty_document="error"), progress=False)


def test_missing_text_field_names_the_fields(tmp_path, make_cfg, write_jsonl):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = write_jsonl(tmp_path / "a.jsonl", ["doc"], field="content")
    with pytest.raises(DataError, match=r"a.jsonl.*no field 'text'.*\['content', 'id'\].*text_field"):
        prepare(make_cfg(tmp_path / "s", [src]), progress=False)
    pq.write_table(pa.table({"body": ["doc"]}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"b.parquet.*no field 'text'.*\['body'\]"):
        prepare(make_cfg(tmp_path / "s", [tmp_path / "b.parquet"]), progress=False)
    assert no_manifest(tmp_path / "s")


def test_null_text(tmp_path, make_cfg):
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"text": null}\n')
    with pytest.raises(DataError, match="record 1.*NoneType.*not a string"):
        prepare(make_cfg(tmp_path / "s", [tmp_path / "a.jsonl"]), progress=False)


def test_bad_utf8_error_names_file_and_offset(tmp_path, make_cfg):
    (tmp_path / "a.txt").write_bytes("héllo wörld ".encode() + b"\xff\xfe tail")
    with pytest.raises(DataError, match=r"a.txt: byte 14 is not valid UTF-8.*on_bad_utf8=replace"):
        prepare(make_cfg(tmp_path / "s", [tmp_path / "a.txt"]), progress=False)
    assert no_manifest(tmp_path / "s")


def test_bad_utf8_replace(tmp_path, make_cfg):
    from tokenizers import Tokenizer

    (tmp_path / "a.txt").write_bytes(b"good text \xff more text")
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "json \xc3 bad"}\n')
    cfg = make_cfg(tmp_path / "s", [tmp_path / "a.txt", tmp_path / "b.jsonl"], on_bad_utf8="replace")
    m = prepare(cfg, progress=False)
    assert sorted(os.path.basename(p) for p in m.utf8_replaced_files) == ["a.txt", "b.jsonl"]
    tok = Tokenizer.from_file(str(tmp_path / "s" / "tokenizer.json"))
    from data import open_split

    docs = [tok.decode(d[:-1].tolist()) for d in open_split(tmp_path / "s").iter_documents()]
    assert docs == ["good text \ufffd more text", "json \ufffd bad"]


def test_corrupt_shard_is_caught(tmp_path, make_cfg, random_texts, write_jsonl):
    src = write_jsonl(tmp_path / "a.jsonl", random_texts(40, seed=9))
    cfg = make_cfg(tmp_path / "s", [src])
    m = prepare(cfg, progress=False)
    shard = tmp_path / "s" / m.splits["train"].shards[0].tokens_file
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train_00000.bin has sha256 .* corrupt"):
        TrainBatches(cfg, dp_rank=0, dp_size=1, seed=0)
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(DataError, match="truncated"):
        TrainBatches(cfg, dp_rank=0, dp_size=1, seed=0)


def test_tokenizer_mismatch(tmp_path, make_cfg, random_texts, write_jsonl):
    a = write_jsonl(tmp_path / "a.jsonl", random_texts(40, seed=10))
    b = write_jsonl(tmp_path / "b.jsonl", random_texts(40, seed=11))
    prepare(make_cfg(tmp_path / "a", [a]), progress=False)
    prepare(make_cfg(tmp_path / "b", [b], vocab_size=280), progress=False)
    other = str(tmp_path / "b" / "tokenizer.json")
    with pytest.raises(DataError, match="differs from the one the shards.*were made with"):
        TrainBatches(make_cfg(tmp_path / "a", [a], tokenizer=other), dp_rank=0, dp_size=1, seed=0)
    # and if shards_dir's own tokenizer.json was replaced
    (tmp_path / "a" / "tokenizer.json").write_bytes((tmp_path / "b" / "tokenizer.json").read_bytes())
    with pytest.raises(DataError, match="differs"):
        TrainBatches(make_cfg(tmp_path / "a", [a]), dp_rank=0, dp_size=1, seed=0)


def test_given_tokenizer_without_eos(tmp_path, make_cfg, write_jsonl):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.add_special_tokens(["</s>"])
    tok.save(str(tmp_path / "tok.json"))
    src = write_jsonl(tmp_path / "a.jsonl", ["hello"])
    with pytest.raises(DataError, match=r"no token '<\|endoftext\|>'.*\['</s>'\].*eos_token"):
        prepare(make_cfg(tmp_path / "s", [src], tokenizer=str(tmp_path / "tok.json")), progress=False)
    with pytest.raises(DataError, match="does not exist"):
        prepare(make_cfg(tmp_path / "s", [src], tokenizer=str(tmp_path / "none.json")), progress=False)


def test_vocab_too_large_for_the_model(prepared):
    m = read_manifest(prepared.shards_dir)
    check_vocab_fits(m, m.vocab_size)
    with pytest.raises(DataError, match=f"vocab_size {m.vocab_size}.*model's vocab_size is 100"):
        check_vocab_fits(m, 100)


def test_missing_manifest(tmp_path, make_cfg):
    with pytest.raises(DataError, match="no manifest.json.*prepare_data.py"):
        TrainBatches(make_cfg(tmp_path / "empty", ["x.jsonl"]), dp_rank=0, dp_size=1, seed=0)


def test_corpus_too_small_for_a_step(prepared):
    cfg = prepared.model_copy(update={"tokens_per_step": 1 << 20})
    with pytest.raises(DataError, match="cannot fill one step.*tokens_per_step"):
        TrainBatches(cfg, dp_rank=0, dp_size=1, seed=0)


def test_config_errors_name_the_key():
    base = dict(sources=["a.jsonl"], shards_dir="s", seq_len=64, micro_batch_size=2, tokens_per_step=256)
    DataConfig(**base)
    for bad, key in [
        ({"tokens_per_step": 100}, "tokens_per_step"),
        ({"seq_len": 48}, "power of two"),
        ({"min_len": 128}, "min_len"),
        ({"min_len": 12}, "min_len"),
        ({"curriculum": "grow"}, "curriculum"),
        ({"sources": []}, "sources"),
        ({"shards": "x"}, "shards"),  # unknown key
        ({"tokenizer": "tok.txt"}, "tokenizer.json"),
    ]:
        with pytest.raises(ValidationError, match=key):
            DataConfig(**{**base, **bad})
    assert DataConfig(**{**base, "seq_len": 48, "mode": "concat", "tokens_per_step": 192}).seq_len == 48
    cfg = DataConfig(**base)
    assert cfg.grad_accum_steps(1) == 2 and cfg.grad_accum_steps(2) == 1
    with pytest.raises(ValueError, match=r"tokens_per_step=256 .*micro_batch_size \* data.seq_len \* dp_size.*512"):
        cfg.grad_accum_steps(4)


def test_dtype_follows_vocab():
    from data.tokenizer import token_dtype

    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
