#!/usr/bin/env bash
# Creates .venv and installs the project with its test tools, CPU-only.
# torch and triton are pinned in the same pip command: an unpinned torch pulls a multi-GB CUDA build,
# and triton 3.7.1 is what CUDA torch 2.13 pins (3.9 removed block pointers).
# Then the `cuda` extra's Python layers without their CUDA builds (about 15 s): the tests run the packages'
# own wrappers on the CPU, with stand-ins for the compiled modules (tests/cuda_standins.py). A GPU machine
# installs the real builds with `pip install .[cuda]`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check \
    "torch==2.13.0" "triton==3.7.1" numpy -e ".[dev]"
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE \
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps \
    "mamba-ssm==2.3.2.post1" "causal-conv1d==1.7.0" "flash-attn==2.8.3"
