"""The pretraining loop: setup -> (resume) -> for each step: micro batches, backward, step -> log -> save.

DeepSpeed owns data parallelism, ZeRO, precision, gradient accumulation and clipping; this file owns
the order of things and the trainer's own state (step, tokens seen, data position).
"""

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from data import TrainBatches, check_vocab_fits
from eval.periodic import evaluate_during_training
from models import CausalLM
from models.lm import LMOutput
from train import checkpoint, context_parallel, sequence_parallel
from train.config import RunConfig
from train.deepspeed_config import deepspeed_config
from train.distributed import init_distributed, shutdown
from train.kernel_report import check_kernels, configure_kernels, run_kernel_report
from train.metrics import MetricsLogger, device_peak
from train.optimizer import AdamW, build_optimizer
from train.preemption import Preemption
from train.schedule import lr_at

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainEngine:
    """The DeepSpeed engine with what the loop needs beside it: our optimizer (to skip an update) and the
    recorder its checkpoint files go through (train/checkpoint.py)."""

    engine: object
    optimizer: AdamW
    recorder: checkpoint.Recorder
    n_params: int


def _logged_values(result: "StepResult", grad_norm) -> dict:
    """A log step's loss and auxiliary loss (means over every rank) and the global gradient norm, read back to
    the host together: the log step's one extra host sync."""
    means = torch.stack([result.loss, result.aux_loss]).to(torch.float64)
    dist.all_reduce(means)
    values = means / dist.get_world_size()
    if isinstance(grad_norm, torch.Tensor):  # DeepSpeed's norm, the same on every rank
        values = torch.cat([values, grad_norm.detach().to(values)[None]])
    loss, aux, *norm = values.tolist()
    return {"loss": loss, "aux_loss": aux, "grad_norm": norm[0] if norm else grad_norm}


@dataclass
class Parallel:
    """Where this rank sits: data-parallel replica dp_rank of dp_size; within it, rank sp_rank of its Ulysses
    (SP) group and cp_rank of its context-parallel (CP) group. The sp x cp ranks of a replica read the same
    batch; rank cp_rank * sp + sp_rank of them holds that contiguous share of every sequence."""

    rank: int
    world: int
    dp_rank: int
    dp_size: int
    sp_rank: int = 0
    sp_size: int = 1
    sp_group: object = None
    cp_rank: int = 0
    cp_size: int = 1
    cp_group: object = None
    seq_group: object = None  # the sp x cp ranks of one replica
    mpu: object = None
    loss_scale: float = 1.0

    @property
    def seq_rank(self) -> int:
        return self.cp_rank * self.sp_size + self.sp_rank

    @property
    def seq_size(self) -> int:
        return self.sp_size * self.cp_size


def setup_parallel(cfg: RunConfig) -> Parallel:
    rank, _, world = init_distributed(cfg.parallel.timeout_minutes)
    cfg.check_world_size(world)
    sp, cp = cfg.parallel.sequence_parallel_size, cfg.parallel.context_parallel_size
    if sp * cp == 1:
        return Parallel(rank, world, dp_rank=rank, dp_size=world)
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

    # DeepSpeed sees one sequence-splitting group of sp x cp consecutive ranks ([0, 1], [2, 3], ...): it reduces
    # gradients and partitions ZeRO over data x sequence ranks, as for Ulysses alone. Inside it, the Ulysses
    # groups are consecutive ranks and the CP groups strided by sp. Every rank creates every group.
    mpu.initialize_sequence_parallel(sp * cp)

    def mine(rank_lists: list[list[int]]):
        """Creates every group (each rank must create all of them); returns the one holding this rank."""
        groups = [(ranks, dist.new_group(ranks)) for ranks in rank_lists]
        return next(group for ranks, group in groups if rank in ranks)

    starts = range(0, world, sp * cp)
    sp_group = mine([[s0 + c * sp + s for s in range(sp)] for s0 in starts for c in range(cp)]) if sp > 1 else None
    cp_group = mine([[s0 + c * sp + s for c in range(cp)] for s0 in starts for s in range(sp)]) if cp > 1 else None
    seq_rank = rank % (sp * cp)
    return Parallel(rank, world, dp_rank=rank // (sp * cp), dp_size=world // (sp * cp), sp_rank=seq_rank % sp,
                    sp_size=sp, sp_group=sp_group, cp_rank=seq_rank // sp, cp_size=cp, cp_group=cp_group,
                    seq_group=mpu.get_sequence_parallel_group(), mpu=mpu,
                    loss_scale=sequence_parallel.loss_scale(cfg.parallel.zero_stage, sp * cp))


def current_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def build_engine(cfg: RunConfig, par: Parallel) -> TrainEngine:
    """The model (same init on every rank, SP applied from outside) wrapped in a DeepSpeed engine."""
    import deepspeed

    ds_config = deepspeed_config(cfg, par.dp_size)
    torch.manual_seed(cfg.seed)
    if cfg.parallel.zero_stage == 3:
        # Each module's parameters are partitioned as soon as it is built (DeepSpeed's zero.Init), so no rank
        # ever holds the whole model; the initialisation then runs one module at a time on gathered
        # parameters, drawing from rank 0's generator, so the weights equal the unpartitioned build's.
        with deepspeed.zero.Init(config_dict_or_path=ds_config, mpu=par.mpu):
            model = CausalLM(cfg.model, init=False)
        model.reset_parameters(whole=lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0))
    else:
        model = CausalLM(cfg.model)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    if par.cp_size > 1:  # with Ulysses inside each piece when sp > 1
        context_parallel.apply_context_parallel(model, par.cp_group, par.seq_group, par.sp_group)
        if par.rank == 0:
            inside = f" (Ulysses over {par.sp_size} inside each piece)" if par.sp_size > 1 else ""
            log.info("context parallelism over %d ranks%s, layers by mode: %s", par.cp_size, inside,
                     context_parallel.describe(model, cfg.data.separate_documents))
    elif par.sp_size > 1:
        sequence_parallel.apply_sequence_parallel(model, par.sp_group)
    optimizer = build_optimizer(model, cfg.optim)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=par.mpu)
    recorder = checkpoint.Recorder()
    recorder.install(engine)
    return TrainEngine(engine, optimizer, recorder, n_params)


def forward(engine, micro_batch: dict[str, torch.Tensor], par: Parallel) -> LMOutput:
    """The model on this rank's tokens of the micro batch; `loss` is their mean (plus any auxiliary loss)."""
    row_length = micro_batch["input_ids"].shape[1]
    if par.seq_size > 1:
        micro_batch = sequence_parallel.shard_sequence(micro_batch, par.seq_rank, par.seq_size)
    ids, labels = (micro_batch[k].to(engine.device) for k in ("input_ids", "labels"))
    # Packed documents (data.separate_documents): the boundaries stay on the host, where they are checked.
    return engine(ids, labels=labels, cu_seqlens=micro_batch.get("cu_seqlens"), row_length=row_length,
                  return_logits=False)


def coalesces_gradients(engine, par: Parallel) -> bool:
    """Whether a step's gradients are reduced once, in parameter order, after all its backward passes
    (DeepSpeed's coalesce_grad_reduction) rather than by ZeRO-2's hooks as each gradient is ready. ZeRO-2
    fills its reduction buckets in the order gradients become ready, which must be the same on every rank;
    under context parallelism the ranks' graphs differ (the middle pieces run their mixers twice, and their
    transitions), so the order does too. ZeRO-0/1 reduce in parameter order anyway; ZeRO-3's mixers are leaf
    modules (train/context_parallel.py)."""
    return par.cp_size > 1 and engine.zero_optimization_stage() == 2


def reduction_context(engine, par: Parallel):
    return engine.coalesce_grad_reduction() if coalesces_gradients(engine, par) else contextlib.nullcontext()


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's mean loss over its micro batches, on the device (synced at log steps only)
    aux_loss: torch.Tensor  # the same for the auxiliary losses (0 without any)
    finite: bool  # every rank's every micro batch had a finite loss (else the update was skipped)
    stop: bool  # some rank has received a stop signal (train/preemption.py)


def train_step(run: TrainEngine, micro_batches: list[dict], par: Parallel, lr: float,
               stop_requested=lambda: False) -> StepResult:
    """One optimizer step over this rank's micro batches, with one host sync: before the last micro batch's
    backward, one all-reduce (MAX) of [any non-finite loss here, stop_requested() on this rank] and its
    read-back.
    Losses stay on the device (torchtitan and nanoGPT do the same), so the GPU queue never drains mid-step.

    A step whose loss is NaN or inf in any micro batch on any rank is skipped on every rank: the optimizer's
    update does nothing (AdamW's skip_update, read by the last micro batch's engine.step()), so weights,
    moments and the step count stay exactly as they were; every micro batch's backward still runs (ZeRO's
    hooks expect one per micro batch), and its non-finite gradients are dropped with the update."""
    engine = run.engine
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    device = engine.device
    loss_sum = torch.zeros((), device=device)
    aux_sum = torch.zeros((), device=device)
    bad = torch.zeros((), device=device)
    finite, stop = True, False
    coalesce = coalesces_gradients(engine, par)
    with reduction_context(engine, par):
        for i, mb in enumerate(micro_batches):
            out = forward(engine, mb, par)
            loss = out.loss.detach().float()
            loss_sum += loss
            aux_sum += 0.0 if out.aux_loss is None else out.aux_loss.detach().float()
            bad = torch.maximum(bad, (~torch.isfinite(loss)).float())
            if i == len(micro_batches) - 1:  # the decision, before the step the last backward triggers
                flags = torch.stack([bad, torch.tensor(float(stop_requested()), device=device)])
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # every rank takes the same decisions
                any_bad, any_stop = flags.tolist()
                finite, stop = any_bad == 0, any_stop > 0
                run.optimizer.skip_update = not finite
            engine.backward(out.loss * par.loss_scale)
            if not coalesce:
                engine.step()
    if coalesce:  # one optimizer step for the whole block (DeepSpeed's coalesce_grad_reduction contract)
        engine.set_gradient_accumulation_boundary(True)
        engine.step()
        engine.set_gradient_accumulation_boundary(None)  # back to DeepSpeed's own micro-step counting
    run.optimizer.skip_update = False
    return StepResult(loss_sum / len(micro_batches), aux_sum / len(micro_batches), finite, stop)


def pretrain(cfg: RunConfig, resume: str | None = None) -> list[dict]:
    """Trains per `cfg`; returns the logged records (rank 0's view, identical on every rank)."""
    preemption = Preemption()  # SIGUSR1/SIGTERM: checkpoint after the current step, then exit 75
    configure_kernels(cfg)
    par = setup_parallel(cfg)
    try:
        records = _train(cfg, par, resume, preemption)
    except BaseException:
        # A process group left to interpreter teardown sometimes aborts the process ("terminate called without
        # an active exception", exit -6) after the error is printed, which loses the run's exit code.
        shutdown(clean=False)
        raise
    shutdown()
    return records


def _train(cfg: RunConfig, par: Parallel, resume: str | None, preemption: Preemption) -> list[dict]:
    model_config = cfg.model.model_dump(mode="json")
    rank = par.rank
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)  # (the launcher's logging set-up made it already)
    with torch.device("meta"):
        shape = CausalLM(cfg.model)  # free: the kernel ops it calls, and its FLOPs per token at each length
    # Before anything costly: which path each kernel op takes, and a stop if a fast path cannot run (strict).
    kernels = run_kernel_report(cfg, current_device(), shape)
    check_kernels(kernels, rank, run_dir)
    checkpoint.check_writable(cfg.checkpoint_dir, {run_dir / "config.json": json.dumps(cfg.model_dump(mode="json"),
                                                                                       indent=1)})
    resume_path = checkpoint.resolve_resume(resume, cfg.checkpoint_dir)  # verified, split over the ranks
    if resume_path is not None:
        checkpoint.check_model_config(resume_path, model_config)

    # Ranks of one sequence-parallel group read the same batch and each keep their share of its tokens.
    batches = TrainBatches(cfg.data, dp_rank=par.dp_rank, dp_size=par.dp_size, seed=cfg.seed)
    check_vocab_fits(batches.manifest, cfg.model.vocab_size)
    run = build_engine(cfg, par)
    engine = run.engine

    state = {"step": 0, "tokens_seen": 0, "nonfinite_in_row": 0, "skipped_steps": 0}
    if resume_path is not None:
        log.info("resuming from %s", resume_path)
        state = checkpoint.load(engine, resume_path)
        batches.load_state_dict(state.pop("data"))
    log.info("model: %s parameters, %.3g training FLOPs per token at T=%d", f"{run.n_params:,}",
             shape.flops_per_token(cfg.data.seq_len), cfg.data.seq_len)
    metrics = MetricsLogger(run_dir, cfg, rank=rank, world_size=par.world, start_step=state["step"],
                            flops_per_token=shape.flops_per_token, peak=device_peak(),
                            resolved_config=cfg.model_dump(mode="json") | {"kernel_report": kernels})
    records = []
    try:
        while state["step"] < cfg.schedule.steps:
            lr = lr_at(state["step"], cfg.optim.lr, cfg.schedule)
            micro_batches = batches.next_step()
            seq_len = micro_batches[0]["input_ids"].shape[1]
            result = train_step(run, micro_batches, par, lr, stop_requested=preemption.requested)
            finite = result.finite
            if finite:
                state["step"] += 1
                state["tokens_seen"] += cfg.data.tokens_per_step
                state["nonfinite_in_row"] = 0
                metrics.advance(cfg.data.tokens_per_step, seq_len)
            else:  # the batch is dropped; the step is taken again on the next one, at the same LR
                state["nonfinite_in_row"] += 1
                state["skipped_steps"] += 1
                if rank == 0:
                    log.warning("loss is NaN/inf at step %d (%d in a row): update skipped, weights and optimizer "
                                "state unchanged, batch dropped", state["step"] + 1, state["nonfinite_in_row"])
                records.append(metrics.log_other(state["step"], {"skipped_steps": state["skipped_steps"]}))
            step = state["step"]
            if finite and (step % cfg.logging.every == 0 or step == cfg.schedule.steps):
                # aux_loss: auxiliary losses (MoM's load balancing), included in `loss`; 0 for families without one.
                values = _logged_values(result, engine.get_global_grad_norm())
                records.append(metrics.log(step, {
                    "loss": values["loss"], "lr": lr, "grad_norm": values["grad_norm"],
                    "tokens_seen": state["tokens_seen"], "skipped_steps": state["skipped_steps"], "seq_len": seq_len,
                    "aux_loss": values["aux_loss"],
                }))
            if finite and cfg.eval.every and step % cfg.eval.every == 0:
                # Every rank runs it on whole sequences (unsplit under SP): identical work keeps ZeRO-3's
                # parameter gathers in step.
                with sequence_parallel.unsplit(engine.module) as model:
                    scores = evaluate_during_training(model, cfg.eval, cfg.data.shards_dir, cfg.data.seq_len)
                records.append(metrics.log_other(step, scores))
            if state["nonfinite_in_row"] >= cfg.optim.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"loss was NaN/inf for {state['nonfinite_in_row']} steps in a row (at step {step + 1}); lower "
                    "optim.lr, check the data, or raise optim.max_nonfinite_steps"
                )
            # Every rank stops after the same step, whichever rank got the signal (train_step's all-reduce).
            stop = result.stop and step < cfg.schedule.steps
            if finite and (step % cfg.checkpoint.every == 0 or step == cfg.schedule.steps) or stop:
                checkpoint.save(engine, run.recorder, cfg.checkpoint_dir, step,
                                {**state, "data": batches.state_dict()}, model_config, cfg.checkpoint.keep_last)
            if stop:
                preemption.exit(step)  # logs "preempted at step N", exits with PREEMPTED_EXIT_CODE
    finally:
        metrics.close()
    return records
