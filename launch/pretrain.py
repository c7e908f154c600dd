"""Pretrain a model from one YAML config.

    deepspeed --num_gpus 2 launch/pretrain.py --config configs/tiny/transformer.yaml
    torchrun --standalone --nproc_per_node 2 launch/pretrain.py --config configs/tiny/transformer.yaml
    python launch/pretrain.py --config configs/xlstm_7b.yaml --dry-run
"""

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from data import DataError  # noqa: E402
from mixer_kernels.backend import KernelFallbackError, KernelSettingsError  # noqa: E402
from train.checkpoint import CHECKPOINT_FAILED_EXIT_CODE, CheckpointError, CheckpointWriteError  # noqa: E402
from train.config import ConfigError, load_config  # noqa: E402
from train.logs import configure_logging  # noqa: E402
from train.trainer import NonFiniteLossError, pretrain  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. optim.lr=1e-3")
    parser.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint) or a checkpoint folder")
    parser.add_argument("--dry-run", action="store_true", help="print config, parameters and memory; no training")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_args()

    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    try:
        cfg = load_config(args.config, args.set, world_size=world_size)
        try:
            configure_logging(cfg.logging.level, rank, None if args.dry_run else Path(cfg.run_dir) / "train.log")
        except OSError as e:
            raise ConfigError(f"run_dir {cfg.run_dir} cannot be written ({e}); choose a writable run_dir") from None
        if args.dry_run:
            from train.dry_run import dry_run

            dry_run(cfg, world_size)
            return 0
        pretrain(cfg, resume=args.resume)
    except CheckpointWriteError as e:  # its own exit code: the job script can tell "no space" from a bad run
        report(e, rank, world_size)
        return CHECKPOINT_FAILED_EXIT_CODE
    except (ConfigError, DataError, CheckpointError, NonFiniteLossError, KernelFallbackError, KernelSettingsError) as e:
        # Expected failures carry a message naming the problem and the fix; no traceback needed.
        report(e, rank, world_size)
        return 1
    return 0


def report(error: Exception, rank: int, world_size: int) -> None:
    """One line on stderr. A config error is the same on every rank (each reads the same files), so rank 0 says
    it once; any other can be one rank's own (its shard, its disk), so each rank says it under its number."""
    if isinstance(error, ConfigError) or world_size == 1:
        if rank == 0:
            print(f"error: {error}", file=sys.stderr)
    else:
        print(f"error (rank {rank}): {error}", file=sys.stderr)


def exit_now(code: int) -> None:
    """Ends the process with `code`, skipping the interpreter's teardown. By now the run has closed its metrics,
    written its checkpoints and destroyed its process group; all that teardown adds is the chance that a C++
    thread left by gloo or DeepSpeed aborts the process ("terminate called without an active exception",
    exit -6), which turns a finished run, or a failed one's exit code, into a crash the job script misreads."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_and_exit() -> None:
    try:
        exit_code = main()
    except SystemExit as e:  # preemption (75) and argparse (2) end through here too
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
        exit_code = e.code if isinstance(e.code, int) else int(e.code is not None)
    exit_now(exit_code)


if __name__ == "__main__":
    run_and_exit()
