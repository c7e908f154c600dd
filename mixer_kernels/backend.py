"""The one backend mechanism of every op in mixer_kernels/: which path a call takes, and why.

Every op has a PyTorch reference (`mixer_kernels/<op>/reference.py`); most also have a fast path, our own
Triton kernel or a CUDA package from the `cuda` extra (mamba-ssm, causal-conv1d, flash-attn). `OPS`
lists them. Three settings choose between the two:

- `backend`: `auto` (default): the fast path when the tensors are on a CUDA device and it can run there,
  the reference otherwise; `fast`: the fast path, or an error naming the fix (our Triton kernels also run
  on CPU tensors under TRITON_INTERPRET=1, which the tests use); `reference`: always the reference.
- `overrides`: the same per op, e.g. {"mlstm": "reference"}.
- `strict` (default: true on CUDA tensors): on a CUDA device, a fast path that cannot run (its package
  does not import, or the call needs something it lacks) stops with KernelFallbackError; with
  strict=false it logs one WARNING per op and takes the reference. A reference asked for on purpose
  (`reference`, globally or per op) is never a fallback.

Settings come from the run config's `kernels:` section (`configure`, called by the trainer) over the
environment variable HP_KERNELS, for scripts and tests: `HP_KERNELS=reference`,
`HP_KERNELS=auto,mlstm=fast,strict=false` (a backend first, then op=mode and strict=... in any order).

`plan(op, device, dtype)` is the decision alone, for reports made before anything runs
(train/kernel_report.py); `choose(op, x)` is what a dispatcher calls for each call: the same decision,
then the strict rule. The CUDA packages are imported lazily, here and nowhere else.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

ENV = "HP_KERNELS"
MODES = ("auto", "fast", "reference")
CUDA_EXTRA_FIX = "`pip install .[cuda]` on the GPU machine"
TRITON_FIX = "`pip install triton==3.7.1`"
# Variables of earlier versions, no longer read: setting one warns and names its replacement.
RETIRED_ENV = {
    "HP_KERNEL_BACKEND": "HP_KERNELS=<auto|fast|reference> (cuda is now fast)",
    "MLSTM_BACKEND": "HP_KERNELS=mlstm=<auto|fast|reference> (triton is now fast)",
    "GLA_BACKEND": "HP_KERNELS=gla=<auto|fast|reference> (triton is now fast)",
    "DELTA_RULE_BACKEND": "HP_KERNELS=delta_rule=<auto|fast|reference> (triton is now fast)",
}


@dataclass(frozen=True)
class Op:
    """One op of mixer_kernels/. `fast` describes its fast path (None: the reference is its only path, and
    `note` says why); `package` is the import that fast path needs ('triton' for our own kernels)."""

    name: str
    reference: str
    fast: str | None = None
    package: str = ""
    function: str = ""
    dtypes: tuple[torch.dtype, ...] = ()  # dtypes the fast path takes; empty: any
    note: str = ""

    @property
    def triton(self) -> bool:
        return self.package == "triton"


_HALF = (torch.float16, torch.bfloat16)
OPS: dict[str, Op] = {op.name: op for op in (
    Op("mlstm", "mixer_kernels/mlstm/reference.py mlstm_chunkwise", "own Triton chunkwise kernel (mixer_kernels/mlstm/triton.py)",
       "triton"),
    Op("mlstm_step", "mixer_kernels/mlstm/reference.py mlstm_recurrent_step",
       note="one decoding step: memory bound and tiny"),
    Op("gla", "mixer_kernels/gla/reference.py gla_chunk", "own Triton chunk kernel (mixer_kernels/gla/triton.py)", "triton"),
    Op("gla_step", "mixer_kernels/gla/reference.py gla_step", note="one decoding step: memory bound and tiny"),
    Op("delta_rule", "mixer_kernels/delta_rule/reference.py delta_rule_chunk",
       "own Triton chunk kernel (mixer_kernels/delta_rule/triton.py)", "triton"),
    Op("delta_rule_step", "mixer_kernels/delta_rule/reference.py delta_rule_step",
       note="one decoding step: memory bound and tiny"),
    Op("selective_scan", "mixer_kernels/selective_scan/reference.py selective_scan",
       "mamba-ssm selective_scan_fn (CUDA)", "mamba_ssm.ops.selective_scan_interface", "selective_scan_fn"),
    Op("selective_state_update", "mixer_kernels/selective_scan/reference.py selective_state_update_ref",
       "mamba-ssm selective_state_update (Triton)", "mamba_ssm.ops.triton.selective_state_update",
       "selective_state_update"),
    Op("ssd", "mixer_kernels/ssd/reference.py ssd_chunked", "mamba-ssm mamba_chunk_scan_combined (Triton)",
       "mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"),
    Op("ssd_step", "mixer_kernels/ssd/reference.py ssd_step_ref", "mamba-ssm selective_state_update (Triton)",
       "mamba_ssm.ops.triton.selective_state_update", "selective_state_update"),
    Op("causal_conv1d", "mixer_kernels/causal_conv1d/reference.py causal_conv1d_ref", "causal-conv1d causal_conv1d_fn",
       "causal_conv1d", "causal_conv1d_fn"),
    Op("causal_conv1d_update", "mixer_kernels/causal_conv1d/reference.py causal_conv1d_update_ref",
       "causal-conv1d causal_conv1d_update", "causal_conv1d", "causal_conv1d_update"),
    Op("attention", "mixer_kernels/attention/reference.py attention_ref (SDPA)",
       "flash-attn flash_attn_func / flash_attn_varlen_func", "flash_attn", "flash_attn_func", _HALF),
    Op("checkpoint_attention", "mixer_kernels/attention/reference.py checkpoint_attention_ref",
       note="two matmuls over T x N scores that cuBLAS runs well; flash-attn has no mask of this shape"),
)}


@dataclass(frozen=True)
class Settings:
    backend: str = "auto"
    overrides: Mapping[str, str] = field(default_factory=dict)
    strict: bool | None = None  # None: true on CUDA tensors

    def mode(self, op: str) -> str:
        return self.overrides.get(op, self.backend)

    def as_dict(self) -> dict:
        return {"backend": self.backend, "overrides": dict(self.overrides), "strict": self.strict}


class KernelFallbackError(RuntimeError):
    """A fast path that was required (strict, or asked for) cannot run; the message names the op and the fix."""


@dataclass(frozen=True)
class Choice:
    """The path of one op: `fast` or `reference`, what runs and why; `fallback` when the fast path was
    wanted and cannot run (an error under strict), with the `problem` and the `fix`."""

    op: str
    path: str
    runs: str
    reason: str
    fallback: bool = False
    problem: str = ""
    fix: str = ""

    @property
    def fast(self) -> bool:
        return self.path == "fast"

    def as_dict(self) -> dict:
        extra = {"problem": self.problem, "fix": self.fix} if self.fallback else {}
        return {"op": self.op, "path": self.path, "runs": self.runs, "reason": self.reason,
                "fallback": self.fallback, **extra}


def fallback_message(rows: list[dict]) -> str:
    """One message for fast paths that cannot run (`Choice.as_dict()` rows): what, why, and the fixes."""
    ops = [r["op"] for r in rows]
    fixes = list(dict.fromkeys(r["fix"] for r in rows if r["fix"]))
    on_purpose = ("kernels.overrides: {" + ", ".join(f"{op}: reference" for op in ops) + "} (HP_KERNELS="
                  + ",".join(f"{op}=reference" for op in ops) + ")")
    what = "; ".join(f"{r['op']}: {r['problem']}" for r in rows)
    reference = f"take the PyTorch reference on purpose with {on_purpose}"
    return f"the fast path of kernel {', '.join(ops)} cannot run ({what}). Fix: " \
           + ("; ".join([*fixes, "or " + reference]) if fixes else reference)


class KernelSettingsError(ValueError):
    """A kernel backend setting that does not exist ($HP_KERNELS or the `kernels:` section)."""


def check_mode(mode: str, where: str) -> str:
    if mode not in MODES:
        raise KernelSettingsError(f"{where}: kernel backend {mode!r} is not one of {', '.join(MODES)}")
    return mode


def check_op(op: str, where: str) -> str:
    if op not in OPS:
        raise KernelSettingsError(f"{where}: unknown kernel op {op!r}; known ops: {', '.join(OPS)}")
    return op


def check_override(op: str, mode: str, where: str) -> tuple[str, str]:
    check_op(op, where)
    check_mode(mode, f"{where} {op}")
    if mode == "fast" and OPS[op].fast is None:
        raise KernelSettingsError(f"{where}: {op}=fast, but {op} has no fast path ({OPS[op].note}); drop the override")
    return op, mode


@functools.cache
def parse_env(value: str) -> Settings:
    """Settings from HP_KERNELS' text: 'reference', 'auto,mlstm=fast,strict=false'."""
    backend, overrides, strict = "auto", {}, None
    for item in filter(None, (part.strip().lower() for part in value.split(","))):
        key, sep, mode = item.partition("=")
        if not sep:
            backend = check_mode(key, f"${ENV}")
        elif key == "strict":
            if mode not in ("true", "false", "1", "0"):
                raise KernelSettingsError(f"${ENV}: strict={mode!r} must be true or false")
            strict = mode in ("true", "1")
        else:
            overrides.update([check_override(key, mode, f"${ENV}")])
    return Settings(backend, overrides, strict)


_configured: Settings | None = None


def settings() -> Settings:
    """The settings in force: those `configure`d by the run, else $HP_KERNELS."""
    if _configured is not None:
        return _configured
    _warn_retired_env()
    return parse_env(os.environ.get(ENV, ""))


def _merged(base: Settings, backend: str | None, overrides: Mapping[str, str] | None, strict: bool | None) -> Settings:
    """`base` with a backend or strict given here winning and the overrides merged in; validated."""
    return Settings(
        check_mode(backend, "kernels.backend") if backend is not None else base.backend,
        {**base.overrides, **dict(check_override(op, m, "kernels.overrides") for op, m in (overrides or {}).items())},
        strict if strict is not None else base.strict,
    )


def configure(backend: str | None = None, overrides: Mapping[str, str] | None = None,
              strict: bool | None = None) -> Settings:
    """The run's `kernels:` section, over $HP_KERNELS: a backend or strict given here wins, overrides merge."""
    global _configured
    env = parse_env(os.environ.get(ENV, ""))
    _configured = _merged(env, backend, overrides, strict)  # validated first: a bad value keeps the old ones
    return _configured


@contextlib.contextmanager
def using(backend: str | None = None, overrides: Mapping[str, str] | None = None,
          strict: bool | None = None) -> Iterator[Settings]:
    """Settings over the ones in force, for the duration of a block (tests, benches); restored afterwards."""
    global _configured
    saved = _configured
    try:
        _configured = _merged(settings(), backend, overrides, strict)
        yield _configured
    finally:
        _configured = saved


_retired_warned: set[str] = set()


def _warn_retired_env() -> None:
    for name, replacement in RETIRED_ENV.items():
        if name in os.environ and name not in _retired_warned:
            _retired_warned.add(name)
            logger.warning("%s is no longer read: use %s", name, replacement)


@functools.cache
def load_function(module: str, name: str) -> tuple[Callable | None, str]:
    """(function, "") when `module.name` imports, else (None, the reason): for lazy, optional imports."""
    try:
        return getattr(importlib.import_module(module), name), ""
    except (ImportError, OSError, AttributeError) as err:  # OSError: an extension built for another torch
        return None, f"{type(err).__name__}: {err}"


def _fast_path_unavailable(op: Op) -> str:
    """Why the fast path cannot be imported here ('' when it can)."""
    if op.triton:
        return "" if importlib.util.find_spec("triton") is not None else "triton is not installed"
    return load_function(op.package, op.function)[1]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def plan(op_name: str, device: torch.device | str, dtype: torch.dtype | None = None, unmet: str | None = None,
         config: Settings | None = None) -> Choice:
    """The path `op_name` takes for tensors on `device` of `dtype`, with no side effects. `unmet`: a
    condition of this call the fast path lacks (the dispatcher's check), e.g. 'a key prefix with varlen'."""
    op, config = OPS[op_name], config or settings()
    device = torch.device(device)
    mode = config.mode(op.name)
    on_cuda = device.type == "cuda"
    where = f"{mode} on {device.type}"
    reference = f"PyTorch reference ({op.reference})"
    if op.fast is None:
        return Choice(op.name, "reference", reference, f"the only path: {op.note}")
    if mode == "reference":
        return Choice(op.name, "reference", reference, "asked for (reference)")
    if mode == "auto" and not on_cuda:
        return Choice(op.name, "reference", reference, f"auto on {device.type}: the fast path needs CUDA tensors")
    problem = _fast_path_unavailable(op)
    fix = (TRITON_FIX if op.triton else CUDA_EXTRA_FIX) if problem else ""
    if not problem and not on_cuda and not (op.triton and _interpreting()):
        problem = f"the tensors are on {device.type}" + (
            " (set TRITON_INTERPRET=1 before triton is imported to run a Triton kernel on the CPU)" if op.triton else "")
        fix = "move the model to a CUDA device"
    if not problem and op.dtypes and dtype is not None and dtype not in op.dtypes:
        problem = f"{op.fast} takes {'/'.join(str(d).removeprefix('torch.') for d in op.dtypes)}, not " \
                  f"{str(dtype).removeprefix('torch.')}"
        fix = "use bf16 tensors (parallel.precision=bf16 in a run, --dtype bfloat16 in launch/evaluate.py)"
    if not problem and unmet:
        problem, fix = unmet, ""
    if not problem:
        return Choice(op.name, "fast", op.fast, where)
    return Choice(op.name, "reference", reference, f"{where}, but {problem}", True, problem, fix)


def is_strict(device: torch.device | str, config: Settings | None = None) -> bool:
    strict = (config or settings()).strict
    return torch.device(device).type == "cuda" if strict is None else strict


def stops(op: str, device: torch.device | str, config: Settings | None = None) -> bool:
    """Whether a fallback of `op` stops the run: under strict, or where the fast path was asked for."""
    config = config or settings()
    return config.mode(op) == "fast" or is_strict(device, config)


STRICT_HINT = "(kernels.strict=false, or HP_KERNELS=strict=false, takes the reference with a warning instead)"


_warned: set[str] = set()  # ops whose fallback was already reported (by a WARNING or a kernel report)
_logged: set[tuple[str, str]] = set()
_seen: set[str] = set()  # every op `choose` was asked for: what a model really calls (tests compare it)


def choose(op_name: str, x: torch.Tensor, unmet: str | None = None) -> Choice:
    """The path of this call (see `plan`), with the strict rule applied: a fallback raises when the fast
    path was asked for (`fast`) or under strict, else warns once per op."""
    config = settings()
    _seen.add(op_name)
    choice = plan(op_name, x.device, x.dtype, unmet, config)
    if choice.fallback:
        if stops(op_name, x.device, config):
            hint = "" if config.mode(op_name) == "fast" else f" {STRICT_HINT}"
            raise KernelFallbackError(fallback_message([choice.as_dict()]) + hint)
        if op_name not in _warned:
            _warned.add(op_name)
            logger.warning("%s (kernels.strict is false: taking the reference)", fallback_message([choice.as_dict()]))
    if (op_name, choice.reason) not in _logged:
        _logged.add((op_name, choice.reason))
        logger.debug("kernel %s: %s, %s", op_name, choice.runs, choice.reason)
    return choice


def fast_function(choice: Choice) -> Callable:
    """The CUDA package function behind a fast `choice` (imported once)."""
    op = OPS[choice.op]
    return load_function(op.package, op.function)[0]


def note_reported(ops: list[str]) -> None:
    """A kernel report has shown these ops' fallbacks: `choose` does not warn about them again."""
    _warned.update(ops)


def ops_seen() -> set[str]:
    """The ops `choose` was asked for since the last `reset_for_tests`."""
    return set(_seen)


def reset_for_tests() -> None:
    """Forget what was seen, logged and warned (tests assert on the first message)."""
    for remembered in (_warned, _logged, _seen, _retired_warned):
        remembered.clear()
