"""Prepare the token shards of a run: `python launch/prepare_data.py --config run.yaml [--set data.key=value ...]`.

Reads only the `data:` section of the run config (the full run-config loader
lives in train/), applies `--set data.key=value` overrides (value parsed as
YAML), then runs `data.prepare`. Re-running with the same inputs is a no-op.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from data import DataConfig, DataError, prepare  # noqa: E402


def load_data_config(config: str, overrides: list[str]) -> DataConfig:
    raw = yaml.safe_load(Path(config).read_text()) or {}
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), dict):
        raise SystemExit(f"{config}: no `data:` section; add one with at least sources, shards_dir, seq_len, ...")
    section = dict(raw["data"])
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or "." not in key:
            raise SystemExit(f"--set {item!r}: write --set data.<key>=<value>")
        if not key.startswith("data."):
            print(f"prepare_data: ignoring --set {key} (only the data section is read here)")
            continue
        section[key[5:]] = yaml.safe_load(value)
    return DataConfig(**section)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="run config YAML (its data: section is used)")
    p.add_argument("--set", action="append", default=[], metavar="data.KEY=VALUE", help="override a data field")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        cfg = load_data_config(args.config, args.set)
        manifest = prepare(cfg, progress=not args.quiet)
    except ValidationError as e:
        raise SystemExit(f"{args.config}: invalid data section:\n{e}") from None
    except DataError as e:
        raise SystemExit(f"data error: {e}") from None
    train = manifest.splits["train"]
    print(f"data: {cfg.shards_dir}: {train.num_documents} train documents, {train.num_tokens:,} tokens, "
          f"vocab {manifest.vocab_size}, eos id {manifest.eos_id}")


if __name__ == "__main__":
    main()
