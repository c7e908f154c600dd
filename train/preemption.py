"""Preemption: SIGUSR1 or SIGTERM asks the run to checkpoint after the current step and exit.

Slurm sends SIGUSR1 ahead of the time limit (`#SBATCH --signal=USR1@120` in launch/slurm/pretrain.sbatch)
and SIGTERM on preemption or `scancel`. The handler only sets a flag: a checkpoint is a collective, so it
cannot be written from inside a signal handler, and the signal may reach the ranks at different moments.
The trainer all-reduces the flag (MAX) once per optimizer step, in the same collective as its non-finite
check (train/trainer.py train_step), so every rank stops after the same step. The trainer then saves a checkpoint and `exit()` ends the process with PREEMPTED_EXIT_CODE, which
the sbatch script answers with `scontrol requeue`; the requeued job continues with `--resume auto`.
"""

import signal

import torch.distributed as dist

# EX_TEMPFAIL from sysexits.h: "temporary failure; the user is invited to retry". Any other non-zero code
# means the run failed and must not be requeued.
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preemption:
    """Installs the stop-signal handlers (main thread only); `requested()` is this rank's flag."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.received: signal.Signals | None = None
        self.signals = signals
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum)

    def requested(self) -> bool:
        """Whether this rank has received a stop signal (the trainer agrees on it over every rank)."""
        return self.received is not None

    def exit(self, step: int) -> None:
        """Call after the checkpoint of `step` is complete: ends this rank with PREEMPTED_EXIT_CODE."""
        from train.distributed import shutdown

        # The first rank to exit 75 makes srun (--kill-on-bad-exit) or DeepSpeed's launcher SIGTERM the others.
        # They have saved already; ignoring it lets them end with 75 too instead of dying of the signal in
        # interpreter teardown, where Python's own handlers are gone, so the job's exit code stays 75.
        for sig in self.signals:
            signal.signal(sig, signal.SIG_IGN)
        if dist.get_rank() == 0:
            print(f"preempted at step {step}: checkpoint saved", flush=True)
        shutdown()
        raise SystemExit(PREEMPTED_EXIT_CODE)
