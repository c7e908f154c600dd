"""Backend choice shared by the ops that wrap the CUDA packages (selective_scan, ssd, causal_conv1d).

Each such op has two paths: the CUDA package (mamba-ssm or causal-conv1d, from the `cuda` extra) and
its PyTorch reference in `kernels/<op>/reference.py`. The path is picked per call:

- the `backend=` argument of the op, else the environment variable `HP_KERNEL_BACKEND`, else `auto`;
- `auto`: the CUDA package when the tensors are on a GPU and the package imports, the reference otherwise;
- `cuda`: the CUDA package, or a RuntimeError that names the fix (never an ImportError trace);
- `reference`: always the PyTorch reference.

The packages are imported lazily, here and nowhere else: mamba-ssm cannot even be imported without
its compiled CUDA extension. Each op logs the path it took once (INFO), so a run shows what ran.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

BACKEND_ENV = "HP_KERNEL_BACKEND"
BACKENDS = ("auto", "cuda", "reference")
_logged: set[tuple[str, str]] = set()


@functools.cache
def load_cuda_function(module: str, name: str) -> tuple[Callable | None, str]:
    """(function, "") when `module.name` imports, else (None, the reason): for lazy, optional imports."""
    try:
        return getattr(importlib.import_module(module), name), ""
    except (ImportError, OSError, AttributeError) as err:  # OSError: an extension built for another torch
        return None, f"{type(err).__name__}: {err}"


def requested_backend(backend: str | None) -> str:
    """The backend asked for: the argument, else $HP_KERNEL_BACKEND, else 'auto'."""
    how = backend if backend is not None else os.environ.get(BACKEND_ENV, "auto")
    how = how.strip().lower() or "auto"
    if how not in BACKENDS:
        raise ValueError(
            f"kernel backend {how!r} is not one of {', '.join(BACKENDS)} "
            f"(the backend argument or ${BACKEND_ENV})"
        )
    return how


def log_path_once(op: str, path: str) -> None:
    if (op, path) not in _logged:
        _logged.add((op, path))
        logger.info("%s uses %s", op, path)


def cuda_function(op: str, x: torch.Tensor, backend: str | None, module: str, name: str) -> Callable | None:
    """The CUDA package's `module.name` if this call should use it, None for the PyTorch reference.

    Raises RuntimeError when the CUDA path is requested explicitly but cannot run.
    """
    how = requested_backend(backend)
    fn = None
    if how == "cuda":
        fn, reason = load_cuda_function(module, name)
        package = module.split(".")[0].replace("_", "-")
        if fn is None:
            raise RuntimeError(
                f"{op}: the CUDA path was requested (backend='cuda' or {BACKEND_ENV}=cuda) but {package} "
                f"cannot be imported ({reason}). Install the `cuda` extra on a machine with CUDA: "
                f"`pip install .[cuda]`; or use backend='reference' ({BACKEND_ENV}=reference)."
            )
        if not x.is_cuda:
            raise RuntimeError(
                f"{op}: the CUDA path was requested (backend='cuda' or {BACKEND_ENV}=cuda) but the tensors "
                f"are on {x.device}; {package} runs on CUDA tensors only. Move the model to a GPU "
                f"(with `pip install .[cuda]` there), or use backend='reference' ({BACKEND_ENV}=reference)."
            )
    elif how == "auto" and x.is_cuda:
        fn, _ = load_cuda_function(module, name)
    log_path_once(op, f"{module}.{name}" if fn is not None else "the PyTorch reference")
    return fn
