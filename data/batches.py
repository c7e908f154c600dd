"""`TrainBatches`: the training loop's view of the data, one optimizer step at a time.

Every step takes a fixed `tokens_per_step` from ONE bucket of length L: the
global batch is S = tokens_per_step / L chunks (see `data/decompose.py`; in
concat mode there is a single bucket, L = seq_len). Rank r of dp takes the r-th
contiguous slice of S / dp chunks and cuts it into `grad_accum_steps` micro
batches of micro_batch_size * seq_len / L sequences, so every micro batch holds
micro_batch_size * seq_len tokens and no padding.

Determinism: the global batch of step s is a pure function of (seed, s, shards).
Step s lies in epoch e = s // steps_per_epoch; the epoch's bucket order comes
from `data/curriculum.py` with rng (seed, e), and the chunks of each bucket are
shuffled with rng (seed, e, L). The dp size only decides which slice a rank
reads, so a run resumed with another dp size continues the same global
sequence. `state_dict()` is a few JSON-able numbers (the step counter and what
the order depends on).
"""

from __future__ import annotations

import numpy as np
import torch

from .config import DataConfig
from .curriculum import epoch_plan
from .decompose import Bucket, build_buckets
from .errors import DataError
from .manifest import check_tokenizer, read_manifest
from .shards import TokenShards

STATE_VERSION = 1


def cu_seqlens(doc_ids: np.ndarray) -> torch.Tensor:
    """(n, L) document index per token -> (N + 1,) cumulative document lengths over the flattened n*L tokens,
    every row end included (models/documents.py)."""
    starts = np.ones(doc_ids.shape, dtype=bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return torch.from_numpy(np.append(np.flatnonzero(starts), doc_ids.size))


class TrainBatches:
    """This rank's micro batches of each optimizer step, from prepared shards."""

    def __init__(self, cfg: DataConfig, *, dp_rank: int, dp_size: int, seed: int):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0")
        self.cfg, self.dp_rank, self.dp_size, self.seed = cfg, dp_rank, dp_size, seed
        self.grad_accum_steps = cfg.grad_accum_steps(dp_size)
        self.tokens_per_step = cfg.tokens_per_step

        self.manifest = read_manifest(cfg.shards_dir)
        check_tokenizer(self.manifest, cfg.shards_dir, cfg.tokenizer)
        self.vocab_size, self.eos_id = self.manifest.vocab_size, self.manifest.eos_id
        self.shards = TokenShards(cfg.shards_dir, self.manifest, "train")
        if cfg.verify_checksums:
            # Each rank hashes its own share of the shards: together they check every file once.
            self.shards.verify(range(dp_rank, len(self.shards.files), dp_size))

        self.buckets, self.dropped_tokens = build_buckets(self.shards.offsets, cfg.mode, cfg.seq_len, cfg.min_len)
        self.seqs_per_step = [self.tokens_per_step // b.length for b in self.buckets]
        self.steps_per_bucket = [len(b) // s for b, s in zip(self.buckets, self.seqs_per_step)]
        self.steps_per_epoch = sum(self.steps_per_bucket)
        if self.steps_per_epoch == 0:
            held = ", ".join(f"{b.length}: {len(b) * b.length}" for b in self.buckets)
            raise DataError(
                f"the train split of {cfg.shards_dir} cannot fill one step of data.tokens_per_step="
                f"{self.tokens_per_step} from any bucket (tokens per bucket length: {held}); lower "
                f"data.tokens_per_step or add data"
            )
        self.step = 0
        self._epoch = -1

    # --- the plan: which chunks make up global step s -----------------------------------------------
    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def _load_epoch(self, epoch: int) -> None:
        if epoch == self._epoch:
            return
        rng = np.random.default_rng([self.seed, epoch])
        curriculum = self.cfg.curriculum if self.cfg.mode == "decompose" else "natural"  # concat: one bucket
        self._plan = epoch_plan(curriculum, self.steps_per_bucket, cycles=self.cfg.cycles, rng=rng)
        # _nth[t]: how many steps of the same bucket come before step t of the epoch
        self._nth = np.zeros(len(self._plan), dtype=np.int64)
        for b in range(len(self.buckets)):
            where = np.flatnonzero(self._plan == b)
            self._nth[where] = np.arange(len(where))
        self._perms: dict[int, np.ndarray] = {}
        self._epoch = epoch

    def _perm(self, b: int) -> np.ndarray:
        if b not in self._perms:
            rng = np.random.default_rng([self.seed, self._epoch, self.buckets[b].length])
            self._perms[b] = rng.permutation(len(self.buckets[b]))
        return self._perms[b]

    def global_batch(self, step: int) -> tuple[Bucket, np.ndarray]:
        """(bucket, chunk indices into it) of every sequence of global step `step`, in rank order."""
        epoch, t = divmod(step, self.steps_per_epoch)
        self._load_epoch(epoch)
        b = int(self._plan[t])
        n = self.seqs_per_step[b]
        k = int(self._nth[t])
        return self.buckets[b], self._perm(b)[k * n : (k + 1) * n]

    # --- reading tokens -------------------------------------------------------------------------------
    def _read(self, bucket: Bucket, chunks: np.ndarray) -> np.ndarray:
        """(n, L + 1) tokens: each chunk's L labels and the one token before them."""
        L = bucket.length
        out = np.empty((len(chunks), L + 1), dtype=np.int64)
        for row, c in enumerate(chunks):
            s = int(bucket.start[c])
            out[row] = self.shards.tokens[bucket.shard[c]][s - 1 : s + L]
        return out

    def _doc_ids(self, bucket: Bucket, chunks: np.ndarray) -> np.ndarray:
        """(n, L) 0-based index, within its row, of the document each label token belongs to."""
        L = bucket.length
        pos = bucket.start[chunks][:, None] + np.arange(L)[None, :]  # (n, L) label positions
        ids = np.empty_like(pos)
        for shard in np.unique(bucket.shard[chunks]):
            rows = bucket.shard[chunks] == shard
            ids[rows] = np.searchsorted(self.shards.offsets[shard], pos[rows], side="right") - 1
        return ids - ids[:, :1]

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro batches of the next optimizer step (len == grad_accum_steps)."""
        bucket, chunks = self.global_batch(self.step)
        self.step += 1
        per_rank = len(chunks) // self.dp_size
        mine = chunks[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        seqs = self._read(bucket, mine)  # (per_rank, L + 1)
        doc_ids = self._doc_ids(bucket, mine) if self.cfg.packs_documents else None
        per_micro = per_rank // self.grad_accum_steps
        micro = []
        for m in range(self.grad_accum_steps):
            rows = slice(m * per_micro, (m + 1) * per_micro)
            batch = {
                "input_ids": torch.from_numpy(seqs[rows, :-1].copy()),  # (b, t)
                "labels": torch.from_numpy(seqs[rows, 1:].copy()),  # (b, t)
            }
            if doc_ids is not None:
                batch["cu_seqlens"] = cu_seqlens(doc_ids[rows])
            micro.append(batch)
        return micro

    # --- checkpointing --------------------------------------------------------------------------------
    def _order_keys(self) -> dict:
        """Everything besides the step counter that the global order depends on."""
        c = self.cfg
        return {
            "seed": self.seed,
            "data_fingerprint": self.manifest.fingerprint,
            "mode": c.mode,
            "seq_len": c.seq_len,
            "min_len": c.min_len if c.mode == "decompose" else None,
            "tokens_per_step": c.tokens_per_step,
            "curriculum": c.curriculum if c.mode == "decompose" else None,
            "cycles": c.cycles if c.mode == "decompose" and c.curriculum == "grow_p2" else None,
        }

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "step": self.step, "epoch": self.epoch, **self._order_keys()}

    def load_state_dict(self, d: dict) -> None:
        if d.get("version") != STATE_VERSION:
            raise DataError(f"data loader state has version {d.get('version')}, this code reads {STATE_VERSION}")
        ours = self._order_keys()
        diff = {k: (d.get(k), v) for k, v in ours.items() if d.get(k) != v}
        if diff:
            described = ", ".join(f"{k}: saved {a!r} != now {b!r}" for k, (a, b) in diff.items())
            raise DataError(
                f"cannot resume the data order: {described}. Resume with the same data settings and seed, or "
                f"start without loading the data loader state to begin a new order"
            )
        self.step = int(d["step"])
