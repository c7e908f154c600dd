"""Every Triton kernel compiles for A100 (sm_80) and H100 (sm_90) in every dtype and config it registers and at
every shape a shipped config runs, within the spill budget there (mixer_kernels/aot.SPILL_BUDGET).

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


def run_aot(tmp_path, *args: str, command=("-m", "mixer_kernels.aot")) -> tuple[int, dict, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(ROOT)}
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, *command, "--json", str(out), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    return proc.returncode, json.loads(out.read_text()), proc.stdout + proc.stderr


def test_every_shipped_shape_compiles_within_the_spill_budget(tmp_path):
    code, report, output = run_aot(tmp_path, command=("bench/kernel_resources.py",))
    shipped = {(s["module"].split(".")[1], s["k"], s["v"], s["chunk"], s["dtype"]) for s in report["shipped"]}
    # The shapes real runs use (xLSTM-7B, HGRN2, MoM) and the tiny configs' own, each found from the configs.
    assert {("mlstm", 256, 512, 64, "bf16"), ("gla", 128, 128, 16, "bf16"), ("delta_rule", 256, 256, 16, "bf16"),
            ("mlstm", 32, 64, 64, "fp32"), ("delta_rule", 16, 16, 16, "fp32")} <= shipped, shipped
    at_shipped = [r for r in report["results"] if r["shipped_shape"]]
    assert {r["module"] for r in at_shipped} == {f"mixer_kernels.{m}.triton" for m, *_ in shipped}
    assert all(r["ok"] and r["stack_bytes"] is not None for r in at_shipped)
    over = [f"{r['kernel']} {r['target']} {r['dtype']} {r['config']}: {r['stack_bytes']} B" for r in at_shipped
            if r["over_budget"]]
    assert not over, "spills over budget (forward 0, backward 512 bytes a thread):\n" + "\n".join(over)
    # MoM's `gla` backend at its head size 256 is compiled too (AOT_KERNELS), in every dtype.
    assert {r["dtype"] for r in report["results"] if r["module"] == "mixer_kernels.gla.triton"
            and "K=256" in r["config"].split(",")} == {"fp32", "bf16", "fp16"}
    assert code == 0, output[-3000:]


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
    from mixer_kernels.delta_rule.dispatch import TRITON_CHUNK_SIZES as DELTA_RULE_CHUNKS
    from mixer_kernels.gla.dispatch import TRITON_CHUNK_SIZES as GLA_CHUNKS

    for module, chunks in (("mixer_kernels.gla.triton", GLA_CHUNKS), ("mixer_kernels.delta_rule.triton", DELTA_RULE_CHUNKS)):
        compiled = {int(c.removeprefix("L=")) for r in report["results"] if r["module"] == module
                    for c in r["config"].split(",") if c.startswith("L=")}
        assert compiled == set(chunks), module


def test_the_check_fails_on_broken_kernels_naming_them(tmp_path):
    code, report, output = run_aot(tmp_path, "--module", "tests.kernels.aot_broken_kernels", "--budget")
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
        spilling = by_kernel[("register_tile_too_large", target)]
        assert spilling["fits"] and spilling["over_budget"] and spilling["stack_bytes"] > 512
        assert not by_kernel[("int32_offsets", target)]["over_budget"]
    assert "OVER BUDGET: register_tile_too_large sm_80" in output
