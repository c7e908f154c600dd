"""Every Triton kernel compiles for A100 (sm_80) and H100 (sm_90) in every dtype and config it registers.

The compiler runs in a subprocess without TRITON_INTERPRET (which the rest of the suite sets), since the
interpreter replaces kernels by Python functions.
"""

import json
import os
import subprocess
import sys

import pytest
from harness import ROOT

pytestmark = pytest.mark.slow


def run_aot(tmp_path, *args: str) -> tuple[int, dict, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(ROOT)}
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "kernels.aot", "--json", str(out), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    return proc.returncode, json.loads(out.read_text()), proc.stdout + proc.stderr


def test_every_registered_kernel_compiles_and_fits_on_a100_and_h100(tmp_path):
    code, report, output = run_aot(tmp_path)
    assert report["missing"] == [], "Triton kernels without an AOT_KERNELS entry"
    failures = [f"{r['kernel']} {r['target']} {r['dtype']} {r['config']}: {r['error'] or 'shared memory'}"
                for r in report["results"] if not r["fits"]]
    assert not failures, "\n".join(failures)
    assert code == 0, output[-3000:]
    # The dispatchers run kernels in bf16, fp16 and fp32; each must have been compiled for both targets.
    compiled = {(r["kernel"], r["target"], r["dtype"]) for r in report["results"]}
    kernels = {r["kernel"] for r in report["results"]}
    assert kernels, "no kernel was compiled"
    for kernel in kernels:
        for target in ("sm_80", "sm_90"):
            assert any((kernel, target, d) in compiled for d in ("bf16", "fp16", "fp32")), (kernel, target)
    # Resource numbers come from the compiler, not estimates.
    assert all(r["registers"] and r["shared_bytes"] is not None for r in report["results"])
    # 64-bit indexing: no program id is used as a 32-bit integer (state buffers pass 2^31 elements at 7B sizes).
    narrow = [f"{r['kernel']} {r['dtype']} {r['config']}" for r in report["results"] if r["narrow_program_ids"]]
    assert not narrow, "kernels that index in 32 bits:\n" + "\n".join(narrow)
    # Every chunk size the dispatchers allow is compiled.
    from kernels.delta_rule.dispatch import TRITON_CHUNK_SIZES as DELTA_RULE_CHUNKS
    from kernels.gla.dispatch import TRITON_CHUNK_SIZES as GLA_CHUNKS

    for module, chunks in (("kernels.gla.triton", GLA_CHUNKS), ("kernels.delta_rule.triton", DELTA_RULE_CHUNKS)):
        compiled = {int(c.removeprefix("L=")) for r in report["results"] if r["module"] == module
                    for c in r["config"].split(",") if c.startswith("L=")}
        assert compiled == set(chunks), module


def test_the_check_fails_on_broken_kernels_naming_them(tmp_path):
    code, report, output = run_aot(tmp_path, "--module", "tests.kernels.aot_broken_kernels")
    assert code != 0
    by_kernel = {(r["kernel"], r["target"]): r for r in report["results"]}
    for target in ("sm_80", "sm_90"):
        small = by_kernel[("dot_too_small", target)]
        assert not small["ok"] and "K >= 16" in small["error"]
        large = by_kernel[("shared_memory_too_large", target)]
        assert large["ok"] and not large["fits"] and large["shared_bytes"] > large["shared_limit"]
    assert "dot_too_small" in output and "FAIL" in output
    for target in ("sm_80", "sm_90"):
        assert by_kernel[("int32_offsets", target)]["narrow_program_ids"] == 1
