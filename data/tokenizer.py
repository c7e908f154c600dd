"""Tokenizers: train a byte-level BPE here, or load a given tokenizer.json; find EOS; hash.

A trained tokenizer is GPT-2 style: byte-level pre-tokenizer and decoder (any
text round-trips, no unknown token), the EOS special token first (id 0), then
the 256 byte symbols, then merges up to `vocab_size`. BPE training with
`tokenizers` is deterministic for the same text in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .errors import DataError


def train_bpe(text_batches: Iterable[list[str]], vocab_size: int, eos_token: str) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text_batches, trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.tokenizer: {path} does not exist; give a tokenizer.json path or null to train one")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise DataError(f"data.tokenizer: {path} is not a valid tokenizer.json ({e})") from e


def eos_id(tok: Tokenizer, eos_token: str, where: str) -> int:
    """Id of `eos_token` in `tok`; DataError naming the special tokens it does have."""
    i = tok.token_to_id(eos_token)
    if i is None:
        specials = sorted(t.content for t in tok.get_added_tokens_decoder().values())
        raise DataError(
            f"tokenizer {where} has no token {eos_token!r}; its special tokens are {specials}: set "
            f"data.eos_token to the end-of-document one"
        )
    return i


def vocab_limit(tok: Tokenizer) -> int:
    """One more than the largest id `tok` can produce (what the model's vocab must cover)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def token_dtype(vocab: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab <= 1 << 16 else np.dtype(np.uint32)
