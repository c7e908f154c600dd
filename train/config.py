"""The run config: one YAML file, validated against typed sections before any process group starts.

`load_config(path, overrides)` reads the YAML, applies `--set a.b=value` overrides, and validates. Every
problem (unknown key, wrong type, inconsistent values) raises ConfigError with one message that names
the key and what would fix it.
"""

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from data.config import DataConfig
from eval.periodic import PeriodicEvalConfig
from mixer_kernels import backend
from models.config import ModelConfig, Section


class ConfigError(ValueError):
    """A run config that cannot be used; the message says which key and how to fix it."""


class OptimConfig(Section):
    lr: float = Field(gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.1, ge=0, description="Decoupled weight decay; never on norms, biases, embeddings.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this; 0 disables.")
    max_nonfinite_steps: int = Field(
        5, gt=0, description="Stop after this many steps in a row whose loss was NaN or inf (each is skipped)."
    )


class ScheduleConfig(Section):
    kind: Literal["cosine", "wsd", "constant"] = Field(
        "cosine", description="cosine: warmup then cosine decay; wsd: warmup-stable-decay; constant: warmup only."
    )
    steps: int = Field(gt=0, description="Total optimizer steps of the run.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup from 0 to optim.lr.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final LR as a fraction of optim.lr.")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd only: fraction of steps spent decaying.")

    @model_validator(mode="after")
    def _warmup_fits(self) -> "ScheduleConfig":
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} exceeds steps={self.steps}; lower warmup_steps")
        return self


class ParallelConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    precision: Literal["fp32", "bf16"] = Field("bf16", description="Parameter and activation precision.")
    sequence_parallel_size: int = Field(1, gt=0, description="DeepSpeed-Ulysses sequence-parallel group size.")
    context_parallel_size: int = Field(
        1, gt=0, description="Context-parallel group size: every sequence is cut into this many contiguous pieces, "
        "one per rank, with recurrent states (attention: keys and values) passed between them "
        "(train/context_parallel.py). No head-count limit; world = data x sequence x context parallel.",
    )
    timeout_minutes: float = Field(
        10.0, gt=0, description="Collective timeout: a rank waiting longer on a dead peer fails the job."
    )


class KernelsConfig(Section):
    """Which path each op of mixer_kernels/ takes (mixer_kernels/backend.py; the README's kernel table lists the ops)."""

    backend: Literal["auto", "fast", "reference"] | None = Field(
        None, description="auto: the fast path on CUDA tensors, the PyTorch reference elsewhere; fast: the fast "
        "path or an error; reference: always PyTorch. None: $HP_KERNELS, else auto.",
    )
    overrides: dict[str, Literal["auto", "fast", "reference"]] = Field(
        default_factory=dict, description="The same per op, e.g. {mlstm: reference}.",
    )
    strict: bool | None = Field(
        None, description="A fast path that cannot run on CUDA stops the run before the first step (true) or "
        "takes the reference with one WARNING (false). None: true on CUDA.",
    )

    @field_validator("overrides")
    @classmethod
    def _known_ops(cls, v: dict[str, str]) -> dict[str, str]:
        for op, mode in v.items():
            backend.check_override(op, mode, "kernels.overrides")
        return v


class CheckpointConfig(Section):
    dir: str | None = Field(None, description="Where checkpoints go; default <run_dir>/checkpoints.")
    every: int = Field(100, gt=0, description="Save every this many optimizer steps (and at the end).")
    keep_last: int = Field(3, gt=0, description="Keep this many newest complete checkpoints.")


class LoggingConfig(Section):
    every: int = Field(10, gt=0, description="Log metrics every this many optimizer steps.")
    wandb: Literal["offline", "online", "disabled"] = Field(
        "offline", description="wandb mode; offline needs no account (sync later with `wandb sync`)."
    )
    wandb_project: str = Field("hybrid-pretrain", description="wandb project name.")
    progress_bar: bool = Field(True, description="tqdm progress bar with ETA on rank 0.")
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level of rank 0 (console and <run_dir>/train.log); other ranks log WARNING and up.",
    )


class RunConfig(Section):
    run_dir: str = Field(description="Folder of this run: resolved config, metrics.jsonl, checkpoints, wandb.")
    seed: int = Field(1234, ge=0, lt=2**63, description="Seeds the model init and the data order.")
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    kernels: KernelsConfig = Field(default_factory=KernelsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    eval: PeriodicEvalConfig = Field(default_factory=PeriodicEvalConfig)
    deepspeed: dict[str, Any] = Field(
        default_factory=dict, description="Passed through to DeepSpeed's config, over what we derive."
    )

    @model_validator(mode="after")
    def _sections_agree(self) -> "RunConfig":
        if self.eval.every and self.data.holdout_fraction == 0:
            raise ValueError("eval.every > 0 scores held-out documents: set data.holdout_fraction > 0 "
                             "(and prepare the data again) or eval.every=0")
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}; "
                "lower data.seq_len or raise model.max_seq_len"
            )
        return self

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.run_dir) / "checkpoints")

    def check_world_size(self, world_size: int) -> None:
        """Checks that only make sense once the number of ranks is known (still before any process group)."""
        sp, cp = self.parallel.sequence_parallel_size, self.parallel.context_parallel_size
        if world_size % (sp * cp):
            raise ConfigError(
                f"parallel.sequence_parallel_size x parallel.context_parallel_size = {sp} x {cp} does not divide the "
                f"world size {world_size}; launch a multiple of it or change them"
            )
        try:
            self.data.grad_accum_steps(world_size // (sp * cp))
        except ValueError as e:
            raise ConfigError(f"data: {e}") from None
        if sp * cp > 1:
            self._check_sequence_split(sp, cp)

    def _check_sequence_split(self, sp: int, cp: int) -> None:
        shortest = self.data.min_len if self.data.mode == "decompose" else self.data.seq_len
        key = "data.min_len" if self.data.mode == "decompose" else "data.seq_len"
        if shortest % (sp * cp):
            raise ConfigError(
                f"{key}={shortest}: every sequence length must divide by parallel.sequence_parallel_size x "
                f"parallel.context_parallel_size = {sp * cp} (each rank holds T / {sp * cp} tokens); raise {key} "
                "or lower the sizes"
            )
        import torch

        from models import CausalLM
        from train.context_parallel import check_context_parallel
        from train.sequence_parallel import check_sequence_parallel

        with torch.device("meta"):  # free: no weights are allocated
            model = CausalLM(self.model)
        try:
            if sp > 1:
                check_sequence_parallel(model, sp)
            if cp > 1:
                check_context_parallel(model, cp, shortest // cp, key, sp=sp)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _apply_override(raw: dict, assignment: str) -> None:
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set optim.lr=1e-3")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(value)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key; remove it or fix its spelling")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing; add it")
        else:
            got = e.get("input")
            got = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {key}: {e['msg']}{got}")
    return "\n".join(lines)


def load_config(path: str | os.PathLike, overrides: list[str] = (), world_size: int | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass --config with a path such as configs/tiny/*.yaml")
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                          "save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model:, data:, ...)")
    for assignment in overrides:
        _apply_override(raw, assignment)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, str(path))) from None
    if world_size is not None:
        cfg.check_world_size(world_size)
    return cfg
