"""`DataConfig`: the `data:` section of a run config, validated field by field.

One flat section covers the three stages of the data path, in the order they
run: where documents come from (sources), how they become token shards
(tokenizer, shards), and how shards become optimizer steps (batches).
Each field is checked next to its definition; a check that needs another field
only looks at fields declared above it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

STDLIB_SOURCE = "python-stdlib"


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class DataConfig(BaseModel):
    """Sources, tokenizer, shards and batching of one pretraining run."""

    model_config = ConfigDict(extra="forbid")

    # --- sources -------------------------------------------------------------------------------
    sources: list[str] = Field(
        min_length=1,
        description=(
            "Where documents come from, read in this order. Each entry is a local file (.txt, .jsonl, "
            ".json, .parquet), a directory (every such file below it), a glob ('corpus/*.jsonl'), "
            f"'{STDLIB_SOURCE}' (the demo corpus of this Python's own standard library), or a Hugging "
            "Face hub dataset written 'hf:owner/name[:config][@split]' (needs a network)."
        ),
    )
    text_field: str = Field(
        default="text",
        min_length=1,
        description="Column holding the document text in .jsonl/.json/.parquet files and hub datasets.",
    )
    txt_document: Literal["file", "paragraph", "line"] = Field(
        default="file",
        description="What one document is in a .txt file: the whole file, a blank-line paragraph, or a line.",
    )
    max_documents: int | None = Field(
        default=None,
        ge=1,
        description="Read at most this many documents over all sources (None: all). Keeps demos small.",
    )
    max_text_bytes: int | None = Field(
        default=None,
        ge=1,
        description="Stop before the document that would bring the UTF-8 text read past this many bytes.",
    )
    on_bad_utf8: Literal["error", "replace"] = Field(
        default="error",
        description=(
            "Bytes that are not UTF-8 in a .txt/.jsonl/.json file: 'error' stops, naming the file and "
            "byte offset; 'replace' turns them into U+FFFD and lists the files in the manifest."
        ),
    )
    on_empty_document: Literal["skip", "error"] = Field(
        default="skip",
        description=(
            "A document whose text is empty: 'skip' drops it and counts it in the manifest; 'error' stops. "
            "A corpus with no non-empty document always stops."
        ),
    )
    streaming: bool = Field(
        default=False,
        description=(
            "Read sources as a stream (datasets IterableDataset) instead of building an Arrow cache "
            "first. Use it for corpora larger than the disk cache or for hub datasets."
        ),
    )
    num_proc: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Worker count for loading files and tokenizing (tokenizers' Rust threads). "
            "None: all cores."
        ),
    )

    # --- tokenizer -----------------------------------------------------------------------------
    tokenizer: str | None = Field(
        default=None,
        description=(
            "Path to a tokenizer.json. None: train a byte-level BPE of `vocab_size` on the sources "
            "(saved as shards_dir/tokenizer.json)."
        ),
    )
    vocab_size: int = Field(
        default=2048,
        ge=258,
        description="Vocabulary size of a tokenizer trained here (256 bytes + EOS + at least one merge).",
    )
    tokenizer_train_bytes: int = Field(
        default=200_000_000,
        ge=1,
        description="Train the tokenizer on the first documents up to this many bytes of text.",
    )
    eos_token: str = Field(
        default="<|endoftext|>",
        min_length=1,
        description="The end-of-document token appended to every document; must be in the tokenizer.",
    )

    # --- shards --------------------------------------------------------------------------------
    shards_dir: str = Field(
        min_length=1,
        description="Folder of the prepared shards, manifest.json, tokenizer.json and decomposition.json.",
    )
    tokens_per_shard: int = Field(
        default=1 << 28,
        ge=1024,
        description="Start a new shard file once one holds this many tokens (documents are never split).",
    )
    holdout_fraction: float = Field(
        default=0.0,
        ge=0.0,
        le=0.5,
        description=(
            "Fraction of documents written to the 'val' split instead of 'train' (chosen by a hash of "
            "the document's index, so the same documents are held out on every run)."
        ),
    )

    # --- batches -------------------------------------------------------------------------------
    mode: Literal["decompose", "concat"] = Field(
        default="decompose",
        description=(
            "'decompose': dataset decomposition (Pouransari et al. 2024), variable sequence length, one "
            "bucket per step. 'concat': concatenate documents and cut every `seq_len` tokens."
        ),
    )
    seq_len: int = Field(
        ge=1,
        description=(
            "Maximum sequence length: the concat chunk length, or the largest decomposition bucket "
            "(a power of two in decompose mode)."
        ),
    )
    min_len: int = Field(
        default=64,
        ge=1,
        description=(
            "Decompose mode: the smallest bucket (a power of two <= seq_len). The pieces of a document "
            "shorter than this are dropped and counted in decomposition.json."
        ),
    )
    micro_batch_size: int = Field(
        ge=1,
        description=(
            "Sequences of length seq_len per micro batch per rank; a micro batch at bucket length L "
            "holds micro_batch_size * seq_len / L sequences, so its token count never changes."
        ),
    )
    tokens_per_step: int = Field(
        ge=1,
        description=(
            "Global tokens per optimizer step (all ranks and micro batches): "
            "seq_len * micro_batch_size * dp_size * grad_accum_steps."
        ),
    )
    curriculum: Literal["natural", "grow_p2", "uniform"] = Field(
        default="grow_p2",
        description=(
            "Decompose mode: which bucket each step draws. 'natural': in proportion to the bucket's "
            "tokens; 'grow_p2': short buckets first within each of `cycles` cycles per epoch "
            "(OLMo-core's Grow-P2); 'uniform': every bucket that still has a step's worth alike."
        ),
    )
    cycles: int = Field(default=8, ge=1, description="Number of Grow-P2 cycles per epoch.")
    separate_documents: bool = Field(
        default=False,
        description=(
            "Concat mode: every micro batch carries its document boundaries ('cu_seqlens', the cumulative "
            "document lengths over its flattened tokens) and every layer runs each document as a fresh "
            "sequence, so no token sees another document (models/documents.py). Decompose mode rows are "
            "one document each already and carry none."
        ),
    )
    verify_checksums: bool = Field(
        default=True,
        description="Check the sha256 of the shards against the manifest when training starts.",
    )

    @property
    def packs_documents(self) -> bool:
        """Batches carry document boundaries (only concat rows hold several documents)."""
        return self.separate_documents and self.mode == "concat"

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, values):
        if isinstance(values, dict) and "reset_at_doc_boundary" in values:
            raise ValueError("data.reset_at_doc_boundary is now data.separate_documents (every family keeps "
                             "packed documents apart); rename the key")
        return values

    @field_validator("sources")
    @classmethod
    def _sources_not_blank(cls, v: list[str]) -> list[str]:
        if any(not s.strip() for s in v):
            raise ValueError("data.sources holds an empty string; remove it or give a path")
        return v

    @field_validator("seq_len")
    @classmethod
    def _seq_len_power_of_two(cls, v: int, info: ValidationInfo) -> int:
        if info.data.get("mode") == "decompose" and not _is_power_of_two(v):
            raise ValueError(
                f"data.seq_len={v} must be a power of two in decompose mode (buckets are powers of two); "
                f"use e.g. {1 << max(v.bit_length() - 1, 0)} or set data.mode=concat"
            )
        return v

    @field_validator("min_len")
    @classmethod
    def _min_len_power_of_two(cls, v: int, info: ValidationInfo) -> int:
        seq_len = info.data.get("seq_len")
        if info.data.get("mode") != "decompose" or seq_len is None:
            return v
        if not _is_power_of_two(v):
            raise ValueError(f"data.min_len={v} must be a power of two (it is the smallest bucket)")
        if v > seq_len:
            raise ValueError(f"data.min_len={v} is larger than data.seq_len={seq_len}; set min_len <= seq_len")
        return v

    @field_validator("tokens_per_step")
    @classmethod
    def _tokens_per_step_divides(cls, v: int, info: ValidationInfo) -> int:
        seq_len, mbs = info.data.get("seq_len"), info.data.get("micro_batch_size")
        if seq_len is None or mbs is None:
            return v
        per_micro = seq_len * mbs
        if v % per_micro:
            raise ValueError(
                f"data.tokens_per_step={v} is not a multiple of data.micro_batch_size * data.seq_len = "
                f"{mbs} * {seq_len} = {per_micro}; use e.g. {max(1, round(v / per_micro)) * per_micro}"
            )
        return v

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_is_json(cls, v: str | None) -> str | None:
        if v is not None and not v.endswith(".json"):
            raise ValueError(f"data.tokenizer={v!r} should be the path of a tokenizer.json file, or null")
        return v

    def grad_accum_steps(self, dp_size: int) -> int:
        """Micro batches per rank per optimizer step: tokens_per_step / (micro_batch_size * seq_len * dp_size)."""
        if dp_size < 1:
            raise ValueError(f"dp_size={dp_size} must be >= 1")
        per_round = self.micro_batch_size * self.seq_len * dp_size
        if self.tokens_per_step % per_round or self.tokens_per_step < per_round:
            fix = max(1, round(self.tokens_per_step / per_round)) * per_round
            raise ValueError(
                f"data.tokens_per_step={self.tokens_per_step} must be a positive multiple of "
                f"data.micro_batch_size * data.seq_len * dp_size = {self.micro_batch_size} * {self.seq_len} "
                f"* {dp_size} = {per_round}; set data.tokens_per_step={fix} or lower data.micro_batch_size"
            )
        return self.tokens_per_step // per_round
