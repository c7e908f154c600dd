"""`manifest.json`: what a shards folder holds, and the checks made against it.

The manifest is written last and atomically by `prepare`, so a folder without
one is never mistaken for finished shards. It records the token and document
counts, the tokenizer's sha256, vocab size and EOS id, and a sha256 per file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import DataError

MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
FORMAT_VERSION = 1


class ShardFile(BaseModel):
    """One shard: a flat token file (leading EOS, then documents each ending in EOS) and its offsets."""

    model_config = ConfigDict(extra="forbid")

    tokens_file: str
    """Raw little-endian token ids of `Manifest.dtype`, memory-mapped at read time."""
    offsets_file: str
    """int64 .npy of num_documents + 1 positions: document d is tokens[offsets[d]:offsets[d+1]]."""
    num_tokens: int
    num_documents: int
    tokens_sha256: str
    offsets_sha256: str


class SplitInfo(BaseModel):
    """The shards of one split ('train' or 'val')."""

    model_config = ConfigDict(extra="forbid")

    num_documents: int = 0
    num_tokens: int = 0
    """Document tokens, EOS included (the leading EOS of each shard is not counted)."""
    shards: list[ShardFile] = []


class Manifest(BaseModel):
    """Contents of manifest.json."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    fingerprint: str
    """sha256 of every input and setting that shaped the shards; equal fingerprint -> nothing to redo."""
    dtype: Literal["uint16", "uint32"]
    vocab_size: int
    """One more than the largest token id the tokenizer can produce."""
    eos_id: int
    eos_token: str
    tokenizer_sha256: str
    tokenizer_file: str = TOKENIZER_NAME
    splits: dict[str, SplitInfo]
    text_bytes: int
    """UTF-8 bytes of the text tokenized."""
    empty_documents_skipped: int = 0
    utf8_replaced_files: list[str] = []
    sources: list[dict]
    """What was read, for humans: each source with its files and their sizes / mtimes."""
    settings: dict
    """The config fields that shaped the shards."""


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write to a temp name beside `path`, fsync, then rename: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(shards_dir: str | Path) -> Manifest:
    """Load and validate `shards_dir/manifest.json`; DataError if absent or malformed."""
    path = Path(shards_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"no {MANIFEST_NAME} in {shards_dir}: the shards were never prepared or their preparation did "
            f"not finish; run `python launch/prepare_data.py --config <run.yaml>` first"
        )
    try:
        raw = json.loads(path.read_text())
        manifest = Manifest.model_validate(raw)
    except (ValueError, ValidationError) as e:  # ValueError: JSON or UTF-8 decoding
        raise DataError(f"{path} is not a valid manifest ({e}); delete {shards_dir} and prepare again") from e
    if manifest.format_version != FORMAT_VERSION:
        raise DataError(
            f"{path} has format_version {manifest.format_version}, this code reads {FORMAT_VERSION}; "
            f"prepare the shards again"
        )
    return manifest


def check_vocab_fits(manifest: Manifest, model_vocab_size: int) -> None:
    """DataError unless every token id of the shards is a valid row of the model's embedding."""
    if manifest.vocab_size > model_vocab_size:
        raise DataError(
            f"the shards use a tokenizer of vocab_size {manifest.vocab_size} (token ids up to "
            f"{manifest.vocab_size - 1}) but the model's vocab_size is {model_vocab_size}; set the model's "
            f"vocab_size >= {manifest.vocab_size} or prepare the data with a smaller tokenizer"
        )


def check_tokenizer(manifest: Manifest, shards_dir: str | Path, tokenizer: str | None) -> None:
    """DataError if `tokenizer` (a tokenizer.json path, or None for shards_dir's own) is not the one used."""
    path = Path(tokenizer) if tokenizer is not None else Path(shards_dir) / manifest.tokenizer_file
    if not path.is_file():
        raise DataError(f"tokenizer file {path} does not exist; fix data.tokenizer or prepare the data again")
    sha = sha256_file(path)
    if sha != manifest.tokenizer_sha256:
        raise DataError(
            f"tokenizer {path} (sha256 {sha[:12]}...) differs from the one the shards in {shards_dir} were made "
            f"with (sha256 {manifest.tokenizer_sha256[:12]}...); prepare the data again with this tokenizer, or "
            f"point data.tokenizer to {Path(shards_dir) / manifest.tokenizer_file}"
        )
