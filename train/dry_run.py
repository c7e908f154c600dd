"""`--dry-run`: the resolved config, the parameter count (model on the meta device, so a 7B config
costs nothing), the per-rank memory of model states for the chosen ZeRO stage, and the kernel path of
every op on a CUDA device (on a machine without one: what `auto` would take there with the packages
installed here). No process group."""

import json

import torch

from mixer_kernels.backend import fallback_message
from models import CausalLM
from train.config import RunConfig
from train.kernel_report import configure_kernels, fallbacks, format_report, run_kernel_report


def zero_model_state_bytes(n_params: int, stage: int, ranks: int, precision: str) -> int:
    """Per-rank bytes of parameters, gradients and AdamW states (the ZeRO paper's accounting)."""
    if precision == "bf16":  # bf16 params + bf16 grads + fp32 master, momentum, variance
        params, grads, optim = 2, 2, 12
    else:  # fp32 params + fp32 grads + momentum, variance
        params, grads, optim = 4, 4, 8
    shard = {0: (1, 1, 1), 1: (1, 1, ranks), 2: (1, ranks, ranks), 3: (ranks, ranks, ranks)}[stage]
    return int(n_params * (params / shard[0] + grads / shard[1] + optim / shard[2]))


def dry_run(cfg: RunConfig, world_size: int) -> dict:
    with torch.device("meta"):
        model = CausalLM(cfg.model)
    n_params = sum(p.numel() for p in model.parameters())
    largest_layer = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    stage = cfg.parallel.zero_stage
    report = {
        "parameters": n_params,
        "world_size": world_size,
        "zero_stage": stage,
        "model_states_bytes_per_rank": zero_model_state_bytes(n_params, stage, world_size, cfg.parallel.precision),
        # models/flops.py: matmul FLOPs of a training step (forward and backward) per token at data.seq_len
        "model_flops_per_token": model.flops_per_token(cfg.data.seq_len),
    }
    if stage in (2, 3):
        from train.distributed import use_cpu_accelerator_if_no_gpu

        use_cpu_accelerator_if_no_gpu()
        if stage == 2:
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs as est

            cpu, gpu = est(n_params, num_gpus_per_node=world_size, cpu_offload=False)
        else:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as est

            cpu, gpu, _ = est(n_params, largest_layer, num_gpus_per_node=world_size,
                              cpu_offload=False, cpu_offload_params=False)
        report["deepspeed_estimate_bytes_per_rank"] = {"gpu": gpu, "cpu": cpu}
    configure_kernels(cfg)
    kernels = report["kernels"] = run_kernel_report(cfg, "cuda:0" if torch.cuda.is_available() else "cuda")
    print(json.dumps({"config": cfg.model_dump(mode="json"), "dry_run": report}, indent=1))
    print(f"parameters: {n_params:,} ({n_params / 1e9:.3f} B); training FLOPs per token at "
          f"T={cfg.data.seq_len}: {report['model_flops_per_token']:.4g}")
    print(f"model_states_bytes_per_rank: {report['model_states_bytes_per_rank'] / 2**30:.2f} GiB (ZeRO-{stage}, "
          f"{world_size} ranks, {cfg.parallel.precision})")
    if "deepspeed_estimate_bytes_per_rank" in report:
        est = report["deepspeed_estimate_bytes_per_rank"]
        print(f"DeepSpeed estimate per rank: {est['gpu'] / 2**30:.2f} GiB accelerator, {est['cpu'] / 2**30:.2f} GiB host")
    if not torch.cuda.is_available():
        print("no CUDA device here: the table is what a CUDA device would take with this machine's packages")
    print(format_report(kernels))
    if fallbacks(kernels):
        verdict = "would stop before the first step" if kernels["strict"] else "would warn and go on"
        print(f"a run on CUDA {verdict}: {fallback_message(fallbacks(kernels))}")
    return report
