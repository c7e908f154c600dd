"""Data for pretraining: sources -> tokenizer -> token shards -> decomposition buckets -> steps.

The training loop needs four names:

    cfg = DataConfig(**run_config["data"])
    prepare(cfg)                                   # once, on rank 0: shards + manifest.json (no-op if current)
    batches = TrainBatches(cfg, dp_rank=r, dp_size=n, seed=s)
    check_vocab_fits(read_manifest(cfg.shards_dir), model_vocab_size)
    micro_batches = batches.next_step()            # grad_accum_steps dicts of input_ids / labels (b, t)

Modules, in pipeline order: `config` (DataConfig), `sources` (files, globs, hub,
UTF-8 policy), `stdlib_corpus` (the offline demo corpus), `tokenizer`, `shards`
(writer and memory-mapped reader), `manifest`, `prepare`, `decompose` (buckets
and concat windows), `curriculum` (bucket order per epoch), `batches`
(TrainBatches). Nothing here imports models/, train/ or eval/.
"""

from .batches import TrainBatches
from .config import DataConfig
from .errors import DataError
from .manifest import Manifest, check_tokenizer, check_vocab_fits, read_manifest
from .prepare import prepare
from .shards import TokenShards, open_split

__all__ = [
    "DataConfig",
    "DataError",
    "Manifest",
    "TokenShards",
    "TrainBatches",
    "check_tokenizer",
    "check_vocab_fits",
    "open_split",
    "prepare",
    "read_manifest",
]
