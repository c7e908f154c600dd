"""Process-group setup through DeepSpeed: gloo on CPU, nccl on GPU, chosen from the hardware."""

import os
from datetime import timedelta

import torch


def use_cpu_accelerator_if_no_gpu() -> None:
    """Must run before deepspeed is imported: DeepSpeed picks its accelerator at import time."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init_distributed(timeout_minutes: float) -> tuple[int, int, int]:
    """Initialises the default process group from the launcher's variables; returns (rank, local_rank, world)."""
    use_cpu_accelerator_if_no_gpu()
    import deepspeed

    # The shared-memory collective op is never used here and costs a 75 s C++ build on first init.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if "RANK" not in os.environ:
        # A plain `python launch/pretrain.py`: one rank, no launcher, no mpi4py discovery.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 1000))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=timeout_minutes), verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    else:
        # Ranks share the cores: 2 ranks x 2 threads on 2 cores ran 7x slower than 1 thread each.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return int(os.environ["RANK"]), local_rank, int(os.environ["WORLD_SIZE"])


def shutdown(clean: bool = True) -> None:
    """Ends the process group. `clean=False` is the error path, where another rank may be gone already."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    # Without the barrier a rank sometimes aborts ("terminate called without an active exception").
    if clean:
        dist.barrier()
    elif dist.get_backend() == "gloo":
        try:  # ranks that all raised the same (collective) error meet here; a lone failing rank waits 30 s
            dist.monitored_barrier(timeout=timedelta(seconds=30))
        except RuntimeError:
            pass
    dist.destroy_process_group()
