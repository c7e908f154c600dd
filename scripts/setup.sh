#!/usr/bin/env bash
# Creates .venv and installs the project with its test tools, CPU-only.
# torch and triton are pinned in the same pip command: an unpinned torch pulls a multi-GB CUDA build,
# and triton 3.7.1 is what CUDA torch 2.13 pins (3.9 removed block pointers).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check \
    "torch==2.13.0" "triton==3.7.1" numpy -e ".[dev]"
