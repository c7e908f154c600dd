"""The MQAR recipe: train tiny models of each family on MQAR and compare their recall side by side.

Reproduces Zoology's classic result at CPU scale (`configs/recall/mqar.yaml`, minutes on a laptop): at a
small width attention solves MQAR at every number of key-value pairs, while fixed-state recurrences
(mLSTM, Mamba, Mamba-2) lose accuracy as the pairs outgrow their state.

Why a small single-process loop here and not the DeepSpeed trainer: the examples are synthetic and made
in memory (no token shards, no decomposition buckets), only query positions carry labels (the data
pipeline labels every position of a token stream), several models train back to back in one process in
minutes, and no process group is needed. The loop is the plain AdamW / warmup-cosine / grad-clip one of
Zoology, on the same CausalLM the trainer builds.
"""

import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from pydantic import Field

from eval.generation import state_nbytes
from eval.mqar import MQARSetting, generate_mqar, mqar_accuracy
from models import CausalLM, ModelConfig
from models.config import Section


class MQARTaskConfig(Section):
    vocab_size: int = Field(128, gt=0, description="Token ids of MQAR examples (keys below V/2, values above).")
    power_a: float = Field(0.01, gt=0, description="Power law of query placement (Zoology's power_a).")
    train_settings: list[tuple[int, int]] = Field(
        description="(seq_len, num_kv_pairs) mixed in equal parts in training (Zoology trains on a mixture).")
    train_examples: int = Field(8000, gt=0, description="Training examples per train setting (a fixed pool).")
    eval_seq_lens: list[int] = Field(description="Sequence lengths of the evaluation grid.")
    eval_kv_pairs: list[int] = Field(description="Numbers of key-value pairs of the evaluation grid.")
    eval_examples: int = Field(500, gt=0, description="Held-out examples per evaluation grid point.")


class MQARTrainConfig(Section):
    steps: int = Field(gt=0, description="Optimizer steps per model.")
    batch_size: int = Field(64, gt=0, description="Examples per step, drawn from all train settings' pool.")
    lr: float = Field(3e-3, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(50, ge=0, description="Linear warmup, then cosine decay to 0.")
    grad_clip: float = Field(1.0, ge=0, description="Global gradient-norm clip; 0 disables.")
    seed: int = Field(0, description="Seeds the data, the model init and the batch order.")
    target_accuracy: float | None = Field(
        None, gt=0, le=1, description="Stop early once the held-out accuracy on the train settings reaches it.")
    eval_every: int = Field(100, gt=0, description="Steps between early-stopping checks (with target_accuracy).")


class RecipeConfig(Section):
    task: MQARTaskConfig
    train: MQARTrainConfig
    defaults: dict = Field(default_factory=dict, description="ModelConfig fields shared by every model.")
    models: dict[str, dict] = Field(description="Name -> ModelConfig fields over defaults (one per family).")

    def build_model_config(self, name: str) -> ModelConfig:
        fields = {**self.defaults, **self.models[name]}
        fields.setdefault("vocab_size", self.task.vocab_size)
        fields.setdefault("max_seq_len", max(self.task.eval_seq_lens + [t for t, _ in self.task.train_settings]))
        return ModelConfig(**fields)

    def grid(self) -> list[MQARSetting]:
        return [MQARSetting(self.task.vocab_size, T, kv, self.task.power_a)
                for T in self.task.eval_seq_lens for kv in self.task.eval_kv_pairs if 4 * kv <= T]


def load_recipe(path: str | Path, overrides: dict | None = None) -> RecipeConfig:
    raw = yaml.safe_load(Path(path).read_text())
    for key, value in (overrides or {}).items():  # "train.steps": 100
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return RecipeConfig.model_validate(raw)


def _train_pool(recipe: RecipeConfig, rng: np.random.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One pool per sequence length (settings of equal length share a pool, so a batch mixes their pairs)."""
    t = recipe.task
    pools: dict[int, list] = {}
    for T, kv in t.train_settings:
        pools.setdefault(T, []).append(generate_mqar(MQARSetting(t.vocab_size, T, kv, t.power_a), t.train_examples, rng))
    return ([torch.cat([b.inputs for b in bs]) for bs in pools.values()],
            [torch.cat([b.labels for b in bs]) for bs in pools.values()])


def train_mqar(model: CausalLM, recipe: RecipeConfig, log=print) -> dict:
    """Trains `model` in place on the recipe's MQAR mixture; returns {steps, seconds, final_loss}."""
    tc = recipe.train
    rng = np.random.default_rng(tc.seed)
    inputs, labels = _train_pool(recipe, rng)
    check = [generate_mqar(MQARSetting(recipe.task.vocab_size, T, kv, recipe.task.power_a), 200, rng)
             for T, kv in recipe.task.train_settings]
    device = next(model.parameters()).device
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr)
    gen = torch.Generator().manual_seed(tc.seed)
    start, loss, step = time.perf_counter(), float("nan"), 0
    model.train()
    for step in range(1, tc.steps + 1):
        lr = tc.lr * min(1.0, step / max(1, tc.warmup_steps))
        if step > tc.warmup_steps:
            lr = tc.lr * 0.5 * (1 + math.cos(math.pi * (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        pool = int(torch.randint(len(inputs), (1,), generator=gen))  # one length per step
        idx = torch.randint(len(inputs[pool]), (tc.batch_size,), generator=gen)
        out = model(inputs[pool][idx].to(device), labels=labels[pool][idx].to(device))
        out.loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()
        if step % tc.eval_every == 0 or step == tc.steps:
            model.eval()
            acc = float(np.mean([mqar_accuracy(model, b) for b in check]))
            model.train()
            log(f"  step {step:5d}  loss {loss:.4f}  train-setting accuracy {acc:.3f}  "
                f"{time.perf_counter() - start:.1f}s")
            if tc.target_accuracy is not None and acc >= tc.target_accuracy:
                break
    model.eval()
    return {"steps": step, "train_seconds": time.perf_counter() - start, "final_loss": loss}


@torch.no_grad()
def evaluate_grid(model: CausalLM, recipe: RecipeConfig) -> list[dict]:
    """Accuracy per (seq_len, num_kv_pairs) on held-out examples (a seed the training never draws from)."""
    rng = np.random.default_rng(10_000 + recipe.train.seed)
    return [{"seq_len": s.seq_len, "num_kv_pairs": s.num_kv_pairs,
             "accuracy": mqar_accuracy(model, generate_mqar(s, recipe.task.eval_examples, rng))}
            for s in recipe.grid()]


@torch.no_grad()
def decoding_state_bytes(model: CausalLM, seq_len: int) -> int:
    """Bytes of the decoding state after reading seq_len tokens (fixed for recurrences, grows for attention)."""
    ids = torch.zeros(1, seq_len, dtype=torch.long, device=next(model.parameters()).device)
    return state_nbytes(model(ids, return_state=True).state)


def _entry(model: CausalLM, recipe: RecipeConfig, trained: dict) -> dict:
    family = "+".join(sorted(set(model.cfg.layer_mixers())))
    return {"family": family, "params": sum(p.numel() for p in model.parameters()),
            "state_bytes": decoding_state_bytes(model, max(recipe.task.eval_seq_lens)),
            **trained, "grid": evaluate_grid(model, recipe)}


def run_recipe(recipe: RecipeConfig, only: list[str] | None = None, device: str = "cpu", log=print) -> dict:
    """Trains and evaluates every model of the recipe (or those in `only`): the `mqar` section of a report."""
    results = {}
    for name in only or list(recipe.models):
        torch.manual_seed(recipe.train.seed)
        model = CausalLM(recipe.build_model_config(name)).to(device)
        log(f"MQAR: training {name} ({sum(p.numel() for p in model.parameters())} parameters)")
        results[name] = _entry(model, recipe, train_mqar(model, recipe, log))
    return {"recipe": recipe.model_dump(mode="json"), "models": results}


def finetune_checkpoint(model: CausalLM, recipe: RecipeConfig, name: str = "checkpoint", log=print) -> dict:
    """MQAR for a pretrained checkpoint: a copy of it is trained on the recipe's mixture, then evaluated.

    A model pretrained on text has never seen MQAR's token protocol, so its zero-shot accuracy is chance;
    fine-tuning measures how well its architecture and weights learn to recall. MQAR ids must fit its vocab.
    """
    if recipe.task.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"MQAR vocab_size {recipe.task.vocab_size} exceeds the model's {model.cfg.vocab_size}")
    model = copy.deepcopy(model).float()
    log(f"MQAR: fine-tuning a copy of {name}")
    return {"recipe": recipe.model_dump(mode="json"), "models": {name: _entry(model, recipe, train_mqar(model, recipe, log))}}
