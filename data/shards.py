"""Token shards on disk: the writer used by `prepare` and the memory-mapped reader.

A shard of split S is two files:

- `S_00000.bin`: raw token ids (uint16 when every id fits, else uint32). It starts
  with one EOS, then each document followed by its EOS. The leading EOS is the
  "previous token" of the shard's first document, so every document, first or
  not, is preceded by an EOS that acts as its BOS (see `data/decompose.py`).
- `S_00000.offsets.npy`: int64, num_documents + 1 entries; document d is
  `tokens[offsets[d]:offsets[d + 1]]` (its EOS included).

Documents never span two shards. Files are written under a temp folder and
moved into place by `prepare`; the sha256 of each file is computed while it
is written and stored in the manifest.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from .errors import DataError
from .manifest import Manifest, ShardFile, sha256_file


class ShardWriter:
    """Appends documents (token arrays ending in EOS) to the numbered shards of one split."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, eos_id: int, tokens_per_shard: int):
        self.out_dir, self.split, self.dtype = out_dir, split, np.dtype(dtype)
        self.eos_id, self.tokens_per_shard = eos_id, tokens_per_shard
        self.shards: list[ShardFile] = []
        self._file = None

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):05d}"
        self._name = name
        self._file = open(self.out_dir / f"{name}.bin", "wb")
        self._hash = hashlib.sha256()
        self._offsets = [1]  # position 0 holds the leading EOS
        self._write(np.array([self.eos_id], dtype=self.dtype))

    def _write(self, arr: np.ndarray) -> None:
        b = arr.tobytes()
        self._file.write(b)
        self._hash.update(b)

    def add(self, doc: np.ndarray) -> None:
        """Append one document; `doc` already ends with EOS."""
        if self._file is not None and self._offsets[-1] + len(doc) > self.tokens_per_shard and len(self._offsets) > 1:
            self._close_shard()
        if self._file is None:
            self._open()
        self._write(doc.astype(self.dtype, copy=False))
        self._offsets.append(self._offsets[-1] + len(doc))

    def _close_shard(self) -> None:
        self._file.close()
        offsets = np.asarray(self._offsets, dtype=np.int64)
        buf = io.BytesIO()
        np.save(buf, offsets)
        offsets_path = self.out_dir / f"{self._name}.offsets.npy"
        offsets_path.write_bytes(buf.getvalue())
        self.shards.append(
            ShardFile(
                tokens_file=f"{self._name}.bin",
                offsets_file=offsets_path.name,
                num_tokens=int(offsets[-1]),
                num_documents=len(offsets) - 1,
                tokens_sha256=self._hash.hexdigest(),
                offsets_sha256=hashlib.sha256(buf.getvalue()).hexdigest(),
            )
        )
        self._file = None

    def close(self) -> list[ShardFile]:
        if self._file is not None:
            self._close_shard()
        return self.shards


def read_offsets(path: Path, sf: ShardFile) -> np.ndarray:
    """The document offsets of one shard, checked against its manifest entry (a cheap check at every start;
    the sha256 check, when on, reads every byte)."""
    fix = "the file is damaged or was replaced: prepare the data again"
    try:
        offsets = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"offsets file {path} is not a valid .npy array ({e}); {fix}") from None
    if offsets.dtype != np.int64 or offsets.shape != (sf.num_documents + 1,):
        raise DataError(f"offsets file {path} holds {offsets.dtype} {offsets.shape}, the manifest expects int64 "
                        f"({sf.num_documents + 1},); {fix}")
    if offsets[0] != 1 or offsets[-1] != sf.num_tokens or (np.diff(offsets) <= 0).any():
        raise DataError(f"offsets file {path} does not describe {sf.num_documents} documents ending at token "
                        f"{sf.num_tokens}; {fix}")
    return offsets


class TokenShards:
    """The shards of one split, memory-mapped: `tokens[i]` (1-D array) and `offsets[i]` per shard."""

    def __init__(self, shards_dir: str | Path, manifest: Manifest, split: str = "train"):
        if split not in manifest.splits:
            raise DataError(f"{shards_dir} has no split {split!r}; it has {sorted(manifest.splits)}")
        self.shards_dir, self.manifest, self.split = Path(shards_dir), manifest, split
        self.files = manifest.splits[split].shards
        dtype = np.dtype(manifest.dtype)
        self.tokens: list[np.ndarray] = []
        self.offsets: list[np.ndarray] = []
        for sf in self.files:
            tok_path, off_path = self.shards_dir / sf.tokens_file, self.shards_dir / sf.offsets_file
            for p in (tok_path, off_path):
                if not p.is_file():
                    raise DataError(f"shard file {p} listed in the manifest is missing; prepare the data again")
            if tok_path.stat().st_size != sf.num_tokens * dtype.itemsize:
                raise DataError(
                    f"shard {tok_path} holds {tok_path.stat().st_size} bytes, the manifest expects "
                    f"{sf.num_tokens * dtype.itemsize}; the file is truncated or replaced: prepare the data again"
                )
            self.tokens.append(np.memmap(tok_path, dtype=dtype, mode="r"))
            self.offsets.append(read_offsets(off_path, sf))

    def verify(self, shard_indices=None) -> None:
        """Compare the sha256 of the given shards (default all) with the manifest; DataError on mismatch."""
        indices = range(len(self.files)) if shard_indices is None else shard_indices
        for i in indices:
            sf = self.files[i]
            for name, expected in ((sf.tokens_file, sf.tokens_sha256), (sf.offsets_file, sf.offsets_sha256)):
                actual = sha256_file(self.shards_dir / name)
                if actual != expected:
                    raise DataError(
                        f"shard file {self.shards_dir / name} has sha256 {actual[:12]}..., the manifest says "
                        f"{expected[:12]}...: the file is corrupt or was changed after preparation; delete "
                        f"{self.shards_dir} and run prepare again"
                    )

    @property
    def num_documents(self) -> int:
        return sum(len(o) - 1 for o in self.offsets)

    def document(self, shard: int, index: int) -> np.ndarray:
        """Tokens of one document, its EOS included."""
        o = self.offsets[shard]
        return self.tokens[shard][o[index] : o[index + 1]]

    def iter_documents(self):
        """Every document in order (useful for evaluation on the 'val' split)."""
        for s in range(len(self.files)):
            for d in range(len(self.offsets[s]) - 1):
                yield self.document(s, d)


def open_split(shards_dir: str | Path, split: str = "train", *, verify: bool = True) -> TokenShards:
    """Read a prepared split; with `verify`, every shard's sha256 is checked against the manifest."""
    from .manifest import read_manifest

    shards = TokenShards(shards_dir, read_manifest(shards_dir), split)
    if verify:
        shards.verify()
    return shards
