"""In-training evaluation on a schedule: the config section and the one function the trainer calls.

Wiring (train/ owns it; nothing here imports train/):

    # train/config.py, in RunConfig
    eval: PeriodicEvalConfig = Field(default_factory=PeriodicEvalConfig)

    # train/trainer.py, after the optimizer step (every rank calls it: under ZeRO-3 the forward gathers
    # parameters collectively, and all ranks doing identical work keeps their collectives in step)
    if cfg.eval.every and state["step"] % cfg.eval.every == 0:
        metrics = evaluate_during_training(engine.module, cfg.eval, cfg.data.shards_dir, cfg.data.seq_len)
        if rank == 0: logger.log(state["step"], 0, {"loss": loss, **metrics})   # or a separate eval record

The model is put in eval mode and back; no gradients are kept. Cost is bounded by `max_tokens` per length.
"""

from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from eval.perplexity import heldout_stream, perplexity_by_length
from eval.report import flat_metrics
from models.config import Section


class PeriodicEvalConfig(Section):
    every: int = Field(0, ge=0, description="Evaluate every this many optimizer steps; 0 turns it off.")
    split: str = Field("val", description="Held-out split of data.shards_dir to score.")
    length_multiples: list[float] = Field(
        [1.0, 2.0, 4.0], description="Context lengths as multiples of data.seq_len (beyond 1 shows state collapse).")
    max_tokens: int = Field(16384, gt=0, description="Tokens scored per context length (cost bound).")
    batch_size: int = Field(4, gt=0, description="Windows per forward.")
    chunk_size: int | None = Field(
        None, gt=0, description="Feed long windows in chunks of this many tokens (bounds activation memory).")


_STREAMS: dict[tuple[str, str], np.ndarray] = {}  # the held-out split is read (and checksummed) once per run


@torch.no_grad()
def evaluate_during_training(model, cfg: PeriodicEvalConfig, shards_dir: str | Path, seq_len: int) -> dict:
    """Flat metrics {"eval/ppl@L": ..., "eval/ppl_tail@L": ...} for L = seq_len * each multiple."""
    key = (str(shards_dir), cfg.split)
    if key not in _STREAMS:
        _STREAMS[key] = heldout_stream(shards_dir, cfg.split)
    lengths = sorted({max(1, int(seq_len * m)) for m in cfg.length_multiples})
    was_training = model.training
    model.eval()
    try:
        res = perplexity_by_length(model, _STREAMS[key], lengths, max_tokens=cfg.max_tokens,
                                   batch_size=cfg.batch_size, chunk_size=cfg.chunk_size)
    finally:
        model.train(was_training)
    return flat_metrics({"ppl_by_length": res})
