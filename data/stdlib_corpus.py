"""The demo corpus `python-stdlib`: this Python's own standard library, as JSONL documents.

It exists offline on every machine that runs this project and nobody here
wrote it, so demos and tests train on real text without a download. Where it
comes from: the folder `sysconfig.get_paths()["stdlib"]`.

Documents, in this fixed order:

1. the pydoc topic help texts (`pydoc_data/topics.py`, English prose), one
   document per topic, sorted by topic name; source `pydoc_data/topics.py#<topic>`;
2. every `.py` file below the stdlib folder, sorted by relative path, one file
   per document; source = the relative path. Left out: `site-packages`,
   `dist-packages`, test folders (`test`, `tests`, `idle_test`, which hold
   deliberately broken files), `__pycache__`, `lib-dynload`, `config-*` and the
   machine-specific `_sysconfigdata*` file. Files that are not UTF-8 or are
   empty are skipped and counted in the returned stats.

Caps keep the demo small: `max_documents` stops after that many documents and
`max_bytes` stops before the document that would bring the UTF-8 text past that
many bytes. The output is deterministic for a given Python installation (the
same interpreter build gives byte-identical JSONL).

Command line:

    python -m data.stdlib_corpus OUT.jsonl [--max-bytes 4000000] [--max-documents N]

In a run config, write `sources: ["python-stdlib"]` (with e.g. `max_text_bytes:
4000000` for the tiny demo); `prepare` then writes `shards_dir/python-stdlib.jsonl`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "lib-dynload"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The .py files of the corpus, sorted by path relative to the stdlib folder."""
    root = root or stdlib_root()
    files = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if any(part in EXCLUDED_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("_sysconfigdata") or rel.as_posix() == "pydoc_data/topics.py":
            continue
        files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return {}
    return topics


def iter_documents(stats: dict | None = None) -> Iterator[dict]:
    """Every document of the corpus, uncapped, as {"text", "source"}; counts skips into `stats`."""
    stats = stats if stats is not None else {}
    stats.setdefault("skipped_not_utf8", 0)
    stats.setdefault("skipped_empty", 0)
    topics = _topics()
    for name in sorted(topics):
        yield {"text": topics[name], "source": f"pydoc_data/topics.py#{name}"}
    root = stdlib_root()
    for path in stdlib_files(root):
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            stats["skipped_not_utf8"] += 1
            continue
        if not text.strip():
            stats["skipped_empty"] += 1
            continue
        yield {"text": text, "source": path.relative_to(root).as_posix()}


def write_jsonl(out: str | Path, *, max_documents: int | None = None, max_bytes: int | None = None) -> dict:
    """Write the (capped) corpus to `out`; returns {"documents", "text_bytes", "skipped_*"}."""
    stats: dict = {"documents": 0, "text_bytes": 0}
    with open(out, "w", encoding="utf-8") as f:
        for doc in iter_documents(stats):
            if max_documents is not None and stats["documents"] >= max_documents:
                break
            n = len(doc["text"].encode("utf-8"))
            if max_bytes is not None and stats["text_bytes"] + n > max_bytes:
                break
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            stats["documents"] += 1
            stats["text_bytes"] += n
    return stats


def fingerprint() -> dict:
    """What the corpus depends on, cheaply: Python version, folder, and each file's size and mtime."""
    root = stdlib_root()
    h = hashlib.sha256()
    for p in [*stdlib_files(root), root / "pydoc_data" / "topics.py"]:
        if p.exists():
            st = p.stat()
            h.update(f"{p.relative_to(root).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return {"source": "python-stdlib", "python": sys.version, "root": str(root), "listing_sha256": h.hexdigest()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write the python-stdlib demo corpus as JSONL ({'text', 'source'}).")
    p.add_argument("out", help="output .jsonl path")
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--max-bytes", type=int, default=None, help="cap on UTF-8 bytes of text")
    args = p.parse_args(argv)
    stats = write_jsonl(args.out, max_documents=args.max_documents, max_bytes=args.max_bytes)
    print(f"wrote {args.out}: {stats}")


if __name__ == "__main__":
    main()
