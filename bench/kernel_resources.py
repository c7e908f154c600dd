"""Resource table of every Triton kernel compiled ahead of time for A100 (sm_80) and H100 (sm_90).

    python bench/kernel_resources.py

Shared memory and warps come from Triton's compile metadata, registers and stack (spill) bytes from the
cubin's resource table; `fits` compares shared memory with the target's per-block limit. No GPU needed.
"""

import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.aot import compile_all, print_table  # noqa: E402

if __name__ == "__main__":
    print_table(compile_all())
