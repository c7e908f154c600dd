"""Ahead-of-time compilation of every Triton kernel of the project for real GPUs, on a machine without one.

Triton compiles a kernel all the way to a cubin for a named target without a GPU present (it ships its own
ptxas). That proves what the CPU interpreter cannot: bf16 code paths, compile errors, `tl.dot` layout
constraints and the shared memory a block needs against the target's limit. Resource numbers come from
the compiler: `shared` and `num_warps` from Triton's metadata, registers and stack (spill) bytes from the
cubin's resource table as cuobjdump prints it. The Triton IR also shows whether a kernel indexes in 64 bits:
every program id must be widened to i64 before use (mixer_kernels/triton_launch.py), or offsets built from it wrap
at 2^31 elements.

Registry: every module under mixer_kernels/ that defines a `@triton.jit` kernel exports `AOT_KERNELS`, a list of
{"fn", "name", "dtype", "signature", "constexprs", "num_warps", ...} for each dtype and config its
dispatcher can choose. `jit_kernels_missing_from_registry()` names any kernel without an entry.

    python -m mixer_kernels.aot                       # table for sm_80 and sm_90
    python -m mixer_kernels.aot --json out.json       # machine-readable, used by the tests
    python -m mixer_kernels.aot --module some.module  # only that module's AOT_KERNELS
    python -m mixer_kernels.aot --budget              # also fail on a register spill over SPILL_BUDGET

The spill budget holds at every shipped shape: `python bench/kernel_resources.py` compiles those and checks it.

Must run without TRITON_INTERPRET=1: the interpreter replaces kernels by Python functions.
"""

import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

# Shared memory a block may use (opt-in maximum): H100 227 KiB, A100 163 KiB (CUDA programming guide).
TARGETS = {"sm_80": (80, 163 * 1024), "sm_90": (90, 227 * 1024)}
# Register spill a kernel may have, bytes of stack per thread, at every shape a shipped config runs
# (bench/kernel_resources.py): none in a forward kernel, a little in a backward one.
SPILL_BUDGET = {"forward": 0, "backward": 512}


def spill_budget(kernel: str) -> int:
    """Backward kernels are named *_bw_* or *_bwd_* (mixer_kernels/mlstm, gla, delta_rule)."""
    return SPILL_BUDGET["backward" if "_bw" in kernel else "forward"]


@dataclass
class CompileResult:
    kernel: str
    module: str
    target: str
    dtype: str
    config: str
    ok: bool
    shared_bytes: int | None = None
    shared_limit: int | None = None
    num_warps: int | None = None
    registers: int | None = None
    stack_bytes: int | None = None  # > 0 means registers spilled to local memory
    narrow_program_ids: int | None = None  # program ids used as 32-bit integers (0 = 64-bit indexing)
    error: str = ""

    @property
    def fits(self) -> bool:
        return self.ok and self.shared_bytes is not None and self.shared_bytes <= self.shared_limit


def over_budget(result: CompileResult) -> bool:
    return result.ok and (result.stack_bytes is None or result.stack_bytes > spill_budget(result.kernel))


def print_over_budget(results: list[CompileResult]) -> list[CompileResult]:
    """Prints one line per result over the spill budget; returns them."""
    over = [r for r in results if over_budget(r)]
    for r in over:
        print(f"OVER BUDGET: {r.kernel} {r.target} {r.dtype} {r.config} spills {r.stack_bytes} bytes a thread "
              f"(budget {spill_budget(r.kernel)})")
    return over


def narrow_program_ids(ttir: str) -> int:
    """How many `tt.get_program_id` results the Triton IR uses other than by widening them to i64."""
    narrow = 0
    for name in re.findall(r"(%\w+) = tt\.get_program_id", ttir):
        uses = re.findall(rf"^.*{re.escape(name)}\b.*$", ttir, re.MULTILINE)
        narrow += any("tt.get_program_id" not in use and not re.search(
            rf"arith\.extsi {re.escape(name)} : i32 to i64", use) for use in uses)
    return narrow


def kernel_modules() -> list[str]:
    """Every module under mixer_kernels/ whose source defines a @triton.jit kernel."""
    root = Path(__file__).resolve().parent
    found = []
    for info in pkgutil.walk_packages([str(root)], prefix="mixer_kernels."):
        path = root.joinpath(*info.name.split(".")[1:])
        source = path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__init__.py"
        if source.is_file() and re.search(r"^@triton\.jit", source.read_text(), re.MULTILINE):
            found.append(info.name)
    return sorted(found)


def jit_kernels_missing_from_registry(modules: list[str] | None = None) -> list[str]:
    """'module.kernel' for each @triton.jit function that no AOT_KERNELS entry of its module compiles,
    directly or as a helper it calls."""
    from triton.runtime.jit import JITFunction

    missing = []
    for name in modules or kernel_modules():
        module = importlib.import_module(name)
        specs = getattr(module, "AOT_KERNELS", [])
        registered = {spec["fn"].__name__ for spec in specs}
        jitted = {a: v for a, v in vars(module).items() if isinstance(v, JITFunction) and v.__module__ == name}
        # A @triton.jit helper called from a registered kernel (or from such a helper) is compiled with it.
        covered, frontier = set(registered), list(registered)
        while frontier:
            src = jitted[frontier.pop()].src
            for attr in jitted.keys() - covered:
                if re.search(rf"\b{attr}\(", src):
                    covered.add(attr)
                    frontier.append(attr)
        missing += [f"{name}.{attr}" for attr in sorted(jitted.keys() - covered)]
    return missing


def _resources(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, stack bytes) from the cubin's resource table."""
    from triton.backends.nvidia import compiler as nvidia

    cuobjdump = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    reg, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    return (int(reg.group(1)) if reg else None, int(stack.group(1)) if stack else None)


def _options(spec: dict) -> dict:
    """Launch options the dispatcher passes (num_warps, and num_stages where it is not Triton's default)."""
    options = {"num_warps": spec.get("num_warps", 4)}
    if spec.get("num_stages") is not None:
        options["num_stages"] = spec["num_stages"]
    return options


def compile_spec(spec: dict, module: str, target: str) -> CompileResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cc, limit = TARGETS[target]
    config = ",".join(f"{k}={v}" for k, v in sorted(spec["constexprs"].items()))
    result = CompileResult(spec["fn"].__name__, module, target, spec["dtype"], config, ok=False, shared_limit=limit)
    try:
        compiled = triton.compile(
            ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"]),
            target=GPUTarget("cuda", cc, 32), options=_options(spec),
        )
    except Exception as e:  # any compiler failure is the finding itself
        result.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:500]
        return result
    result.ok = True
    result.shared_bytes = compiled.metadata.shared
    result.num_warps = compiled.metadata.num_warps
    result.registers, result.stack_bytes = _resources(compiled.asm["cubin"])
    result.narrow_program_ids = narrow_program_ids(compiled.asm["ttir"])
    return result


def compile_all(modules: list[str] | None = None, targets=tuple(TARGETS)) -> list[CompileResult]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces kernels by Python functions")
    results = []
    for name in modules or kernel_modules():
        specs = getattr(importlib.import_module(name), "AOT_KERNELS", [])  # none: reported as missing
        results += [compile_spec(spec, name, target) for spec in specs for target in targets]
    return results


def print_table(results: list[CompileResult]) -> None:
    header = f"{'kernel':32} {'target':6} {'dtype':5} {'shared KiB':>10} {'limit':>6} {'warps':>5} {'regs':>4} " \
             f"{'stack':>5} {'i64':3} {'fits':4}  config"
    print(header)
    for r in results:
        shared = f"{r.shared_bytes / 1024:.1f}" if r.ok else "-"
        fits = "yes" if r.fits else ("NO" if r.ok else "FAIL")
        print(f"{r.kernel:32} {r.target:6} {r.dtype:5} {shared:>10} {r.shared_limit // 1024:>6} "
              f"{r.num_warps or '-':>5} {r.registers or '-':>4} {r.stack_bytes if r.ok else '-':>5} "
              f"{'-' if not r.ok else 'yes' if not r.narrow_program_ids else 'NO':3} {fits:4}  "
              f"{r.config}{'  ' + r.error if r.error else ''}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", action="append", help="only these modules (default: every kernel module)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--budget", action="store_true", help="also fail on a spill over SPILL_BUDGET")
    args = parser.parse_args()
    missing = [] if args.module else jit_kernels_missing_from_registry()
    for name in missing:
        print(f"{name} is a Triton kernel with no AOT_KERNELS entry: add one so it is compiled here")
    results = compile_all(args.module)
    print_table(results)
    over = print_over_budget(results) if args.budget else []
    if args.json:
        report = {"missing": missing, "results": [asdict(r) | {"fits": r.fits, "over_budget": over_budget(r)}
                                                  for r in results]}
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if not missing and not over and all(r.fits and not r.narrow_program_ids for r in results) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
