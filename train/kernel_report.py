"""The kernel-path report: for the model, device and dtype of a run, the path each mixer_kernels/ op will take and
why, made before the first step (mixer_kernels/backend.py `plan`: the dispatchers' own decision, nothing runs).

The trainer logs it on rank 0 (console and train.log), writes it to <run_dir>/kernels.json and the wandb
config, and stops the run when a fast path cannot run under `kernels.strict`; `--dry-run` prints it for a
CUDA device, and launch/evaluate.py for its model.
"""

import json
import logging
from pathlib import Path

import torch

from mixer_kernels import backend
from models import CausalLM
from train.config import RunConfig

logger = logging.getLogger(__name__)

# How a packed run (data.separate_documents) keeps its documents apart (models/block.py).
PACKED_DOCUMENTS = ("packed documents: attention layers by varlen attention on cu_seqlens; every other layer "
                    "on each document alone (models/documents.py per_document)")


def configure_kernels(cfg: RunConfig) -> backend.Settings:
    """The run's `kernels:` section, over $HP_KERNELS (mixer_kernels/backend.py)."""
    return backend.configure(cfg.kernels.backend, cfg.kernels.overrides, cfg.kernels.strict)


def run_dtype(cfg: RunConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.parallel.precision == "bf16" else torch.float32


def kernel_report(ops: dict[str, list[int]], device: torch.device | str, dtype: torch.dtype) -> dict:
    """{device, dtype, strict, settings, ops: [{op, path, runs, reason, fallback, (problem, fix), layers}]} for
    a model's `kernel_ops()`."""
    settings = backend.settings()
    rows = [backend.plan(op, device, dtype, None, settings).as_dict() | {"layers": layers}
            for op, layers in ops.items()]
    return {"device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "strict": backend.is_strict(device, settings), "settings": settings.as_dict(), "ops": rows}


def run_kernel_report(cfg: RunConfig, device: torch.device | str, model: CausalLM | None = None) -> dict:
    """The report of a run config's model (built on the meta device unless given) at its precision."""
    if model is None:
        with torch.device("meta"):  # free: no weights are allocated
            model = CausalLM(cfg.model)
    ops = model.kernel_ops()
    report = kernel_report(ops, device, run_dtype(cfg))
    if cfg.data.packs_documents:
        report["documents"] = PACKED_DOCUMENTS
    return report


def format_report(report: dict) -> str:
    head = f"kernels on {report['device']} ({report['dtype']}, strict={str(report['strict']).lower()}):"
    width = max(len(r["op"]) for r in report["ops"])
    lines = [head] + [f"  {r['op']:<{width}}  {r['path']:<9}  {r['runs']}  [{r['reason']}]" for r in report["ops"]]
    if "documents" in report:
        lines.append(f"  {report['documents']}")
    return "\n".join(lines)


def fallbacks(report: dict) -> list[dict]:
    return [r for r in report["ops"] if r["fallback"]]


def check_kernels(report: dict, rank: int = 0, run_dir: Path | None = None) -> None:
    """Logs the report on rank 0 (and writes <run_dir>/kernels.json), then applies the strict rule before
    the first step: a fallback raises KernelFallbackError on every rank under strict (or where the op was
    asked for as `fast`), else it is one WARNING."""
    if rank == 0:
        logger.info("%s", format_report(report))
        if run_dir is not None:
            (run_dir / "kernels.json").write_text(json.dumps(report, indent=1))
    rows = fallbacks(report)
    stopping = [r for r in rows if backend.stops(r["op"], report["device"])]
    if stopping:
        raise backend.KernelFallbackError(f"{backend.fallback_message(stopping)} {backend.STRICT_HINT}")
    if rows:
        if rank == 0:
            logger.warning("%s (kernels.strict is false: taking the reference)", backend.fallback_message(rows))
        backend.note_reported([r["op"] for r in rows])
