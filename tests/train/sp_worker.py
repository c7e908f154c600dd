"""One forward/backward of a fixed batch through the trainer's own setup, on every rank of a torchrun job.

    torchrun --nproc_per_node 2 tests/train/sp_worker.py CONFIG OUT.pt [KEY=VALUE ...]

Rank 0 saves the global mean loss and every parameter's full gradient (gathered from ZeRO partitions), so a
test can compare sequence parallelism against the unsplit model in one process.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from train.config import load_config  # noqa: E402
from train.trainer import build_engine, forward, setup_parallel  # noqa: E402


def fixed_batch(vocab: int, batch: int = 2, seq_len: int = 64) -> dict[str, torch.Tensor]:
    tokens = torch.randint(0, vocab, (batch, seq_len + 1), generator=torch.Generator().manual_seed(7))
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}


def main() -> None:
    config, out, *overrides = sys.argv[1:]
    cfg = load_config(config, overrides, world_size=int(os.environ["WORLD_SIZE"]))
    par = setup_parallel(cfg)
    engine = build_engine(cfg, par).engine
    loss = forward(engine, fixed_batch(cfg.model.vocab_size), par).loss
    engine.backward(loss * par.loss_scale)
    from deepspeed.utils import safe_get_full_grad

    grads = {name: safe_get_full_grad(p).clone() for name, p in engine.module.named_parameters()}
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    if par.rank == 0:
        torch.save({"loss": mean_loss.item() / par.world, "grads": grads}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
