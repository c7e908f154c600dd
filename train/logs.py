"""Logging of a run, configured by the launchers: rank 0 at `logging.level` (INFO by default) and the other
ranks at WARNING, each to the console (stderr, beside the progress bar) and to <run_dir>/train.log, so the
kernel report and the data and checkpoint messages are seen and kept."""

import logging
import sys
from pathlib import Path

_FORMAT = "%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s"
OUR_PACKAGES = ("train", "mixer_kernels", "models", "data", "eval", "launch")
_handlers: list[logging.Handler] = []  # ours, replaced (not doubled) by a second call


def configure_logging(level: str = "INFO", rank: int = 0, log_file: Path | None = None) -> None:
    root = logging.getLogger()
    while _handlers:
        handler = _handlers.pop()
        root.removeHandler(handler)
        handler.close()
    _handlers.append(logging.StreamHandler(sys.stderr))
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        _handlers.append(logging.FileHandler(log_file))  # appends: a resumed run adds to the same file
    formatter = logging.Formatter(_FORMAT.format(rank=rank), datefmt="%Y-%m-%d %H:%M:%S")
    for handler in _handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    # Our packages at the run's level; everything else (DeepSpeed's import-time build probes, ...) at WARNING.
    numeric = logging.getLevelName(level)
    root.setLevel(logging.WARNING)
    for package in OUR_PACKAGES:
        logging.getLogger(package).setLevel(numeric if rank == 0 else max(numeric, logging.WARNING))
