"""launch/pretrain.py with faults injected, for the fault tests (tests/train/test_faults.py). Each fault is an
environment variable; without any, this is launch/pretrain.py.

- FAULT_WRITE_ERRNO=ENOSPC:step_00000004[:name]: every checkpoint file written into that folder (or only
  files whose name contains `name`) fails with that OS error, as on a full disk, a quota or a permission;
- FAULT_PROBE_ERRNO=EACCES: the start-up check that the checkpoint folder is writable fails so;
- FAULT_NAN=iteration:rank:micro_batch (0-based): that micro batch's loss is NaN on that rank;
- FAULT_DROP_BATCH=iteration: that iteration's batch is dropped before training sees it (a run in which
  that batch never came);
- FAULT_FINGERPRINT=path: after every iteration each rank appends the crc32 of its optimizer's parameters
  and state (fp32 partitions under ZeRO) to path.rank<r>.jsonl;
- COUNT_HOST_SYNCS=path: each rank counts the calls that read a tensor back to the host (Tensor.item,
  tolist, bool, float, int) made directly by this project's code (train/, models/, mixer_kernels/, data/, eval/;
  not DeepSpeed's or PyTorch's), per training-loop iteration (from one train_step call to the next, so an
  iteration's logging counts with it), and appends {"step": the step before it, "syncs": n} lines to
  path.rank<r>.jsonl. On a GPU each such read drains the queue.
"""

import errno
import json
import os
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from launch import pretrain  # noqa: E402
from train import checkpoint, trainer  # noqa: E402


def _oserror(name: str, where: str) -> OSError:
    code = getattr(errno, name)
    return OSError(code, os.strerror(code), where)


if spec := os.environ.get("FAULT_WRITE_ERRNO"):
    write_errno, folder, *name = spec.split(":")
    real_open = checkpoint._open_for_write

    def failing_open(path: Path):
        if path.parent.name == folder and (not name or name[0] in path.name):
            raise _oserror(write_errno, str(path))
        return real_open(path)

    checkpoint._open_for_write = failing_open

if probe_errno := os.environ.get("FAULT_PROBE_ERRNO"):
    def failing_probe(path: Path):
        raise _oserror(probe_errno, str(path))

    checkpoint._write_probe = failing_probe

if spec := os.environ.get("FAULT_NAN"):
    nan_at, nan_rank, nan_micro = (int(x) for x in spec.split(":"))
    real_forward, calls = trainer.forward, [0]

    def nan_forward(engine, micro_batch, par):
        out = real_forward(engine, micro_batch, par)
        accum = engine.gradient_accumulation_steps()
        if calls[0] == nan_at * accum + nan_micro and par.rank == nan_rank:
            out.loss = out.loss * float("nan")
        calls[0] += 1
        return out

    trainer.forward = nan_forward

if (drop := os.environ.get("FAULT_DROP_BATCH")) is not None:
    from data import TrainBatches

    real_next, seen = TrainBatches.next_step, [0]

    def next_step_without(self):
        if seen[0] == int(drop):
            real_next(self)
        seen[0] += 1
        return real_next(self)

    TrainBatches.next_step = next_step_without

if out := os.environ.get("FAULT_FINGERPRINT"):
    import torch.distributed as dist

    real_step = trainer.train_step

    def fingerprinted_step(run, *args, **kwargs):
        result = real_step(run, *args, **kwargs)
        crc = 0
        for group in run.optimizer.param_groups:
            for p in group["params"]:
                state = run.optimizer.state.get(p, {})
                for t in (p.data, state.get("exp_avg"), state.get("exp_avg_sq"), state.get("step")):
                    if t is not None:
                        crc = zlib.crc32(t.detach().cpu().contiguous().numpy().tobytes(), crc)
        with open(f"{out}.rank{dist.get_rank()}.jsonl", "a") as f:
            f.write(json.dumps({"finite": result.finite, "crc32": crc}) + "\n")
        return result

    trainer.train_step = fingerprinted_step

if sync_log := os.environ.get("COUNT_HOST_SYNCS"):
    import torch
    import torch.distributed as dist

    project = [str(Path(__file__).resolve().parents[2] / d) for d in ("train", "models", "mixer_kernels", "data", "eval")]
    syncs = [0]

    def counted(name):
        real = getattr(torch.Tensor, name)

        def read_back(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(tuple(project)):
                syncs[0] += 1
            return real(self, *args, **kwargs)
        return read_back

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        setattr(torch.Tensor, name, counted(name))
    counting_step, steps = trainer.train_step, [0]

    def counted_step(run, *args, **kwargs):
        if steps[0]:  # the iteration before this call ended here
            with open(f"{sync_log}.rank{dist.get_rank()}.jsonl", "a") as f:
                f.write(json.dumps({"step": steps[0], "syncs": syncs[0]}) + "\n")
        syncs[0] = 0
        steps[0] += 1
        return counting_step(run, *args, **kwargs)

    trainer.train_step = counted_step

if __name__ == "__main__":
    pretrain.run_and_exit()
