"""One forward/backward of a fixed batch through the trainer's own setup, on every rank of a torchrun job.

    torchrun --nproc_per_node 2 tests/train/sp_worker.py CASES.json

CASES.json: [{"config": ..., "overrides": [KEY=VALUE, ...], "out": OUT.pt, "packed": bool, "seq_len": T}, ...],
all with the same sequence- and context-parallel sizes ("packed": the batch carries PACKED_CU_SEQLENS; T: the
fixed batch's length, 64 by default); one job runs them all (a process group and a DeepSpeed engine per case cost ~7 s on
2 cores). For each, rank 0 saves the global mean loss and every parameter's full gradient (gathered from
ZeRO partitions), so a test can compare sequence parallelism against the unsplit model in one process.
"""

import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from train import sequence_parallel  # noqa: E402
from train.config import load_config  # noqa: E402
from train.trainer import build_engine, coalesces_gradients, forward, reduction_context, setup_parallel  # noqa: E402

# Packed documents of the two 64-token rows: lengths 1, 15, 21, 27 and 40, 24, so documents end on 16-token
# chunk boundaries and off them, and two cross the middle of their row, where the SP=2 ranks' halves meet.
# Two rows of T tokens each (by T): documents of 1 token, starting at a row's start, crossing the middle (where
# CP=2 cuts, and CP=4's second cut at 16 of 64 is a document start).
PACKED_CU_SEQLENS = {64: [0, 1, 16, 37, 64, 104, 128], 48: [0, 1, 16, 29, 48, 78, 96]}


def fixed_batch(vocab: int, batch: int = 2, seq_len: int = 64, packed: bool = False) -> dict[str, torch.Tensor]:
    tokens = torch.randint(0, vocab, (batch, seq_len + 1), generator=torch.Generator().manual_seed(7))
    out = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    if packed:
        out["cu_seqlens"] = torch.tensor(PACKED_CU_SEQLENS[seq_len])
    return out


def run_case(config: str, overrides: list[str], out: str, packed: bool = False, seq_len: int = 64,
             micro_batches: int = 1, par=None):
    """micro_batches > 1: gradient accumulation over that many micro batches of 2 rows on each data-parallel
    replica; the replicas and micro batches take consecutive rows of one fixed batch (fixed_batch)."""
    cfg = load_config(config, overrides, world_size=int(os.environ["WORLD_SIZE"]))
    if par is None:
        par = setup_parallel(cfg)  # the SP groups once per job
    par = dataclasses.replace(par, loss_scale=sequence_parallel.loss_scale(cfg.parallel.zero_stage, par.seq_size))
    engine = build_engine(cfg, par).engine
    batch = fixed_batch(cfg.model.vocab_size, batch=2 * par.dp_size * micro_batches, seq_len=seq_len, packed=packed)
    losses = []
    with reduction_context(engine, par):  # as train_step: reduced once under CP with ZeRO-2
        for i in range(micro_batches):
            rows = slice(2 * (par.dp_rank * micro_batches + i), 2 * (par.dp_rank * micro_batches + i + 1))
            loss = forward(engine, {k: v if k == "cu_seqlens" else v[rows] for k, v in batch.items()}, par).loss
            engine.backward(loss * par.loss_scale)
            losses.append(loss.detach())
            if i < micro_batches - 1 and not coalesces_gradients(engine, par):
                engine.step()  # not an accumulation boundary: counts the micro batch, updates nothing
    from deepspeed.utils import safe_get_full_grad

    grads = {name: safe_get_full_grad(p).clone() for name, p in engine.module.named_parameters()}
    mean_loss = torch.stack(losses).mean()
    dist.all_reduce(mean_loss)
    if par.rank == 0:
        torch.save({"loss": mean_loss.item() / par.world, "grads": grads}, out)
    engine.destroy()
    return par


def main() -> None:
    par = None
    linear = torch.nn.functional.linear
    for case in json.loads(Path(sys.argv[1]).read_text()):
        par = run_case(case["config"], case["overrides"], case["out"], case.get("packed", False),
                       case.get("seq_len", 64), case.get("micro_batches", 1), par)
        # ZeRO-3's zero.Init swaps F.linear for its own for the rest of the process: later cases get the
        # function a fresh job would.
        torch.nn.functional.linear = linear
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
