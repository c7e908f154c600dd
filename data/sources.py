"""Sources: from the `data.sources` strings to batches of document texts, read with `datasets`.

A source string is one of

- a local file: `.txt` (one document per file, paragraph or line, see
  `txt_document`), `.jsonl` / `.json` (one document per record, text in
  `text_field`), `.parquet` (one per row, text in `text_field`);
- a directory: every such file below it, sorted;
- a glob (`*`, `?`, `[`): its matches, sorted; matching nothing is an error;
- `python-stdlib`: the demo corpus of `data/stdlib_corpus.py`;
- `hf:owner/name[:config][@split]`: a Hugging Face hub dataset (needs a network;
  split defaults to 'train'); with `streaming: true` it is never downloaded whole.

Files are loaded with `datasets.load_dataset` ("text", "json", "parquet"),
consecutive files of one format in one call, as a memory-mapped Arrow cache or,
with `streaming`, as an IterableDataset. Before that, every local .txt / .json
/ .jsonl file is scanned for bytes that are not UTF-8 (`on_bad_utf8`): 'error'
names the file and the byte offset of the first bad byte; 'replace' reads a
cleaned copy in which each bad byte became U+FFFD and lists the file in the
manifest. Empty documents are skipped and counted, or stop the run
(`on_empty_document`); a null or non-string text always stops it.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .config import STDLIB_SOURCE, DataConfig
from .errors import DataError

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TEXT_FORMATS = {".txt", ".jsonl", ".json"}  # formats whose bytes we check for UTF-8 ourselves
GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Source:
    """One entry of `data.sources`, resolved: its local files, the stdlib corpus, or a hub dataset."""

    spec: str
    kind: str  # "files" | "stdlib" | "hub"
    files: tuple[Path, ...] = ()
    hub: tuple[str, str | None, str] | None = None  # (name, config, split)


def _resolve_one(spec: str) -> Source:
    if spec == STDLIB_SOURCE:
        return Source(spec, "stdlib")
    if spec.startswith("hf:"):
        rest, _, split = spec[3:].partition("@")
        name, _, config = rest.partition(":")
        if not name:
            raise DataError(f"data.sources: {spec!r} names no dataset; write hf:owner/name[:config][@split]")
        return Source(spec, "hub", hub=(name, config or None, split or "train"))
    supported = ", ".join(BUILDERS)
    if GLOB_CHARS & set(spec):
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True))
        files = [p for p in matches if p.is_file() and p.suffix in BUILDERS]
        if not files:
            raise DataError(
                f"data.sources: the glob {spec!r} matches no {supported} file "
                f"({len(matches)} paths matched in all); fix the pattern or the working directory ({os.getcwd()})"
            )
        return Source(spec, "files", tuple(files))
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in BUILDERS)
        if not files:
            raise DataError(f"data.sources: directory {spec!r} holds no {supported} file")
        return Source(spec, "files", tuple(files))
    if path.suffix not in BUILDERS:
        raise DataError(
            f"data.sources: {spec!r} is not a {supported} file, a directory, a glob, {STDLIB_SOURCE!r} or a hub "
            f"dataset written hf:owner/name"
        )
    if not path.is_file():
        raise DataError(f"data.sources: file {spec!r} does not exist (working directory {os.getcwd()})")
    return Source(spec, "files", (path,))


def resolve_sources(cfg: DataConfig) -> list[Source]:
    return [_resolve_one(s) for s in cfg.sources]


def describe_sources(sources: list[Source]) -> list[dict]:
    """What each source depends on: files with size and mtime, the stdlib listing, or the hub name."""
    from . import stdlib_corpus

    out = []
    for s in sources:
        if s.kind == "files":
            files = []
            for p in s.files:
                st = p.stat()
                files.append({"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
            out.append({"source": s.spec, "files": files})
        elif s.kind == "stdlib":
            out.append(stdlib_corpus.fingerprint())
        else:
            # A hub dataset can change upstream without our knowing; re-preparing needs a config change.
            out.append({"source": s.spec, "hub": list(s.hub)})
    return out


def first_bad_utf8(path: Path, chunk: int = 1 << 22) -> int | None:
    """Byte offset of the first byte of `path` that is not valid UTF-8, or None."""
    dec = codecs.getincrementaldecoder("utf-8")()
    pos = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            pending = len(dec.getstate()[0])
            try:
                dec.decode(block, final=not block)
            except UnicodeDecodeError as e:
                return pos - pending + e.start
            if not block:
                return None
            pos += len(block)


def write_replaced_copy(src: Path, dst: Path, chunk: int = 1 << 22) -> None:
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(src, "rb") as f, open(dst, "w", encoding="utf-8", newline="") as out:
        while True:
            block = f.read(chunk)
            out.write(dec.decode(block, final=not block))
            if not block:
                break


@dataclass
class LoadUnit:
    """One `load_dataset` call: files of one format (or one hub dataset) and the names to show in errors."""

    builder: str
    files: list[str] = field(default_factory=list)
    shown: list[str] = field(default_factory=list)
    hub: tuple[str, str | None, str] | None = None

    def where(self) -> str:
        if self.hub:
            return f"hub dataset {self.hub[0]}"
        return self.shown[0] if len(self.shown) == 1 else f"{self.shown[0]} (and {len(self.shown) - 1} more files)"


def plan_units(sources: list[Source], stdlib_jsonl: Path | None, replaced: dict[Path, Path]) -> list[LoadUnit]:
    """Group the sources into load_dataset calls, in order; `replaced` maps bad-UTF-8 files to clean copies."""
    units: list[LoadUnit] = []
    for s in sources:
        if s.kind == "hub":
            units.append(LoadUnit("hub", hub=s.hub))
            continue
        files = [stdlib_jsonl] if s.kind == "stdlib" else list(s.files)
        for p in files:
            if p.stat().st_size == 0:
                continue  # holds no document (and datasets cannot read it); counted by prepare
            builder = BUILDERS[p.suffix]
            if not units or units[-1].builder != builder or units[-1].hub is not None:
                units.append(LoadUnit(builder))
            units[-1].files.append(str(replaced.get(p, p)))
            units[-1].shown.append(STDLIB_SOURCE if s.kind == "stdlib" else str(p))
    return units


def check_text_field(path: Path, text_field: str) -> None:
    """Cheap early check of the first record of a .jsonl or the schema of a .parquet file."""
    fields = None
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    try:
                        first = json.loads(line.decode("utf-8", errors="replace"))
                    except ValueError as e:
                        raise DataError(f"{path}: the first record is not valid JSON ({e})") from e
                    fields = list(first) if isinstance(first, dict) else None
                    break
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        fields = pq.read_schema(path).names
    if fields is not None and text_field not in fields:
        raise DataError(
            f"{path}: no field {text_field!r}; its fields are {fields}; set data.text_field to the one holding "
            f"the document text"
        )


@dataclass
class ReadStats:
    documents: int = 0
    text_bytes: int = 0
    empty_skipped: int = 0


def _load(unit: LoadUnit, cfg: DataConfig):
    import datasets

    if unit.hub:
        name, config, split = unit.hub
        return datasets.load_dataset(name, config, split=split, streaming=cfg.streaming)
    kwargs = {}
    if unit.builder == "text":
        kwargs["sample_by"] = {"file": "document", "paragraph": "paragraph", "line": "line"}[cfg.txt_document]
    if not cfg.streaming and cfg.num_proc and len(unit.files) > 1:
        kwargs["num_proc"] = min(cfg.num_proc, len(unit.files))
    return datasets.load_dataset(unit.builder, data_files=unit.files, split="train", streaming=cfg.streaming, **kwargs)


def iter_text_batches(
    units: list[LoadUnit],
    cfg: DataConfig,
    stats: ReadStats,
    *,
    max_bytes: int | None = None,
    batch_size: int = 512,
) -> Iterator[list[str]]:
    """Non-empty document texts in source order, in batches; stops at the caps of `cfg` (and `max_bytes`)."""
    caps = [b for b in (cfg.max_text_bytes, max_bytes) if b is not None]
    byte_cap = min(caps) if caps else None
    for unit in units:
        if cfg.max_documents is not None and stats.documents >= cfg.max_documents:
            return
        column = "text" if unit.builder == "text" else cfg.text_field
        try:
            ds = _load(unit, cfg)
            names = ds.column_names
            if names is not None and column not in names:
                raise DataError(
                    f"{unit.where()}: no field {column!r}; its fields are {list(names)}; set data.text_field to "
                    f"the one holding the document text"
                )
            if names is not None:
                ds = ds.select_columns([column])
            row, stop = 0, False
            for batch in ds.iter(batch_size=batch_size):
                if column not in batch:
                    raise DataError(f"{unit.where()}: no field {column!r}; its fields are {list(batch)}")
                out = []
                for text in batch[column]:
                    if not isinstance(text, str):
                        raise DataError(
                            f"{unit.where()}, record {row}: {column!r} is {type(text).__name__} "
                            f"({str(text)[:40]!r}), not a string; fix the record or set data.text_field"
                        )
                    row += 1
                    if not text:
                        if cfg.on_empty_document == "error":
                            raise DataError(
                                f"{unit.where()}, record {row - 1}: the document is empty; remove it or set "
                                f"data.on_empty_document=skip"
                            )
                        stats.empty_skipped += 1
                        continue
                    n = len(text.encode("utf-8"))
                    if cfg.max_documents is not None and stats.documents >= cfg.max_documents:
                        stop = True
                    elif byte_cap is not None and stats.text_bytes + n > byte_cap:
                        stop = True  # caps stop before the first document that does not fit
                    if stop:
                        break
                    stats.documents += 1
                    stats.text_bytes += n
                    out.append(text)
                if out:
                    yield out
                if stop:
                    return
        except DataError:
            raise
        except Exception as e:  # datasets / pyarrow raise many types; name the file and keep the cause
            raise DataError(f"could not read {unit.where()} with datasets ({type(e).__name__}: {e})") from e
