"""The one backend mechanism (mixer_kernels/backend.py): settings from the config and $HP_KERNELS, the decision
for every op on CPU and (simulated) CUDA devices, the strict rule, and the retired variables."""

import logging

import pytest
import torch

from mixer_kernels import backend


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(backend.ENV, raising=False)
    backend.reset_for_tests()


def no_packages(monkeypatch):
    """As on a GPU box where the fast paths' packages fail to import (a wheel built for another torch)."""
    monkeypatch.setattr(backend, "_fast_path_unavailable", lambda op: f"ImportError: {op.package} is broken")


def test_environment_grammar():
    assert backend.parse_env("") == backend.Settings()
    assert backend.parse_env("reference") == backend.Settings("reference")
    s = backend.parse_env("fast, mlstm=reference,strict=false")
    assert (s.backend, dict(s.overrides), s.strict) == ("fast", {"mlstm": "reference"}, False)
    assert s.mode("mlstm") == "reference" and s.mode("gla") == "fast"
    for bad, match in [("cuda", "not one of auto, fast, reference"), ("mlstmx=fast", "unknown kernel op 'mlstmx'"),
                       ("gla=triton", "not one of"), ("strict=maybe", "true or false")]:
        with pytest.raises(ValueError, match=match):
            backend.parse_env(bad)


def test_fast_for_an_op_without_a_fast_path_is_refused():
    with pytest.raises(backend.KernelSettingsError, match="mlstm_step=fast, but mlstm_step has no fast path"):
        backend.parse_env("mlstm_step=fast")
    with pytest.raises(backend.KernelSettingsError, match="no fast path"):
        backend.configure(overrides={"gla_step": "fast"})


def test_a_condition_without_a_fix_still_says_how_to_go_on(monkeypatch):
    monkeypatch.setattr(backend, "load_function", lambda module, name: (print, ""))
    choice = backend.plan("attention", "cuda", torch.bfloat16, unmet="flash-attn's varlen path takes no key prefix")
    message = backend.fallback_message([choice.as_dict()])
    assert "Fix: take the PyTorch reference on purpose" in message and "Fix: or" not in message


def test_config_wins_over_the_environment_and_is_restored(monkeypatch):
    monkeypatch.setenv(backend.ENV, "reference,gla=fast,strict=true")
    with backend.using(overrides={"mlstm": "fast"}, strict=False) as s:
        assert (s.backend, dict(s.overrides), s.strict) == ("reference", {"gla": "fast", "mlstm": "fast"}, False)
        assert backend.settings() is s
        with backend.using(overrides={"ssd": "reference"}) as inner:  # over the settings in force
            assert dict(inner.overrides) == {"gla": "fast", "mlstm": "fast", "ssd": "reference"} and not inner.strict
    assert backend.settings() == backend.parse_env("reference,gla=fast,strict=true")


def test_every_op_on_cpu_takes_the_reference_under_auto():
    for op in backend.OPS:
        choice = backend.plan(op, "cpu", torch.float32)
        assert choice.path == "reference" and not choice.fallback, op


def test_every_fast_op_on_cuda_is_fast_when_its_package_imports(monkeypatch):
    monkeypatch.setattr(backend, "load_function", lambda module, name: (print, ""))
    for op, spec in backend.OPS.items():
        choice = backend.plan(op, "cuda", torch.bfloat16)
        assert choice.path == ("fast" if spec.fast else "reference") and not choice.fallback, op


def test_a_missing_package_on_cuda_is_a_fallback_that_names_the_fix(monkeypatch):
    no_packages(monkeypatch)
    for op, spec in backend.OPS.items():
        choice = backend.plan(op, "cuda", torch.bfloat16)
        assert choice.fallback == (spec.fast is not None), op
        if choice.fallback:
            assert ("triton==3.7.1" if spec.triton else ".[cuda]") in choice.fix
            message = backend.fallback_message([choice.as_dict()])
            assert op in message and f"{op}=reference" in message and f"{spec.package} is broken" in message


def test_reference_on_purpose_is_never_a_fallback(monkeypatch):
    no_packages(monkeypatch)
    with backend.using("reference"):
        assert not any(backend.plan(op, "cuda", torch.bfloat16).fallback for op in backend.OPS)
    with backend.using(overrides={"selective_scan": "reference"}):
        assert not backend.plan("selective_scan", "cuda").fallback and backend.plan("ssd", "cuda").fallback


class FakeCuda:
    """A tensor that says it is on cuda:0 (only .device and .dtype are read by `choose`)."""

    def __init__(self, dtype=torch.bfloat16):
        self.device, self.dtype = torch.device("cuda", 0), dtype


def test_strict_stops_and_not_strict_warns_once(monkeypatch, caplog):
    no_packages(monkeypatch)
    with pytest.raises(backend.KernelFallbackError, match=r"selective_scan.*pip install \.\[cuda\]"):
        backend.choose("selective_scan", FakeCuda())  # strict by default on CUDA
    with backend.using(strict=False), caplog.at_level(logging.WARNING, logger="mixer_kernels.backend"):
        for _ in range(3):
            assert backend.choose("selective_scan", FakeCuda()).path == "reference"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "selective_scan" in warnings[0].getMessage()


def test_fp32_attention_on_cuda_is_a_reported_fallback(monkeypatch):
    """Formerly a quiet fallback: flash-attn takes bf16/fp16 only."""
    monkeypatch.setattr(backend, "load_function", lambda module, name: (print, ""))
    assert backend.plan("attention", "cuda", torch.bfloat16).fast
    choice = backend.plan("attention", "cuda", torch.float32)
    assert choice.fallback and "bf16" in choice.fix and "float32" in choice.problem
    with pytest.raises(backend.KernelFallbackError, match="parallel.precision=bf16"):
        backend.choose("attention", FakeCuda(torch.float32))


def test_asking_for_fast_on_cpu_is_an_error_even_when_not_strict(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with backend.using(overrides={"gla": "fast"}, strict=False):
        with pytest.raises(backend.KernelFallbackError, match="tensors are on cpu"):
            backend.choose("gla", torch.zeros(1))


def test_triton_ops_run_on_cpu_only_under_the_interpreter(monkeypatch):
    with backend.using(overrides={"mlstm": "fast"}):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert backend.choose("mlstm", torch.zeros(1)).fast
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(backend.KernelFallbackError, match="TRITON_INTERPRET=1"):
            backend.choose("mlstm", torch.zeros(1))


def test_retired_variables_warn_and_name_their_replacement(monkeypatch, caplog):
    monkeypatch.setenv("MLSTM_BACKEND", "triton")
    with caplog.at_level(logging.WARNING, logger="mixer_kernels.backend"):
        backend.settings()
        backend.settings()
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["MLSTM_BACKEND is no longer read: use HP_KERNELS=mlstm=<auto|fast|reference> (triton is "
                        "now fast)"]


def test_readme_kernel_table_lists_every_op():
    from harness import ROOT

    readme = (ROOT / "README.md").read_text()
    for op in backend.OPS:
        assert f"| `{op}` |" in readme, op


def test_triton_launches_run_under_their_tensors_device():
    """Triton launches on the current CUDA device: the launchers enter the tensors' own (cuda:1 here)."""
    from mixer_kernels import triton_launch

    class OnCuda1:
        is_cuda, device = True, torch.device("cuda", 1)

    guard = triton_launch.on_device(OnCuda1())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with triton_launch.on_device(torch.zeros(1)):  # CPU tensors (the interpreter): nothing to enter
        pass
    import inspect

    from mixer_kernels.delta_rule import triton as delta_rule
    from mixer_kernels.gla import triton as gla
    from mixer_kernels.mlstm import triton as mlstm

    for module in (mlstm, gla, delta_rule):  # every autograd.Function entry point enters it
        functions = [f for f in vars(module).values() if isinstance(f, type) and issubclass(f, torch.autograd.Function)]
        assert functions and all("launch.on_device(" in inspect.getsource(f.forward) and
                                 "launch.on_device(" in inspect.getsource(f.backward) for f in functions)
