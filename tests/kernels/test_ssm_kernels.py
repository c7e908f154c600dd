"""SSM ops (kernels/selective_scan, kernels/ssd, kernels/causal_conv1d): references against each other,
against plain loops and F.conv1d, against mamba-ssm's and causal-conv1d's own references where installed,
and the dispatch (clear error for a CUDA path that cannot run, one log line per chosen path). CPU, fp32/fp64.
"""

import contextlib
import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from kernels import backend
from kernels.causal_conv1d import causal_conv1d, causal_conv1d_update
from kernels.causal_conv1d.reference import causal_conv1d_ref, causal_conv1d_update_ref
from kernels.selective_scan import selective_scan, selective_state_update
from kernels.selective_scan.reference import selective_scan as selective_scan_cpu
from kernels.selective_scan.reference import selective_scan_ref
from kernels.ssd import ssd, ssd_step
from kernels.ssd.dispatch import ssd_step_with, ssd_with
from kernels.ssd.reference import process_dt, ssd_chunked, ssd_sequential_ref, ssd_step_ref


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS error of a against the reference b."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def grads(outputs, inputs, seed=0):
    """Gradients of a fixed random projection of all outputs (so every output and every input is checked)."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outputs)
    return torch.autograd.grad(loss, inputs)


# ---- causal conv -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv_equals_padded_conv1d(activation):
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 5, 11), torch.randn(5, 4), torch.randn(5)
    y, state = causal_conv1d_ref(x, w, b, activation=activation)
    expected = F.conv1d(x, w.unsqueeze(1), b, padding=3, groups=5)[..., :11]
    expected = expected if activation is None else F.silu(expected)
    assert rel_err(y, expected) < 1e-6
    assert torch.equal(state, x[..., -3:])


def test_causal_conv_state_carries_across_pieces_and_short_inputs():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 5, 9), torch.randn(5, 4), torch.randn(5)
    whole, whole_state = causal_conv1d_ref(x, w, b, activation="silu")
    state, pieces = None, []
    for piece in x.split([2, 1, 6], dim=-1):  # pieces shorter than the width too
        y, state = causal_conv1d_ref(piece, w, b, state, activation="silu")
        pieces.append(y)
    assert rel_err(torch.cat(pieces, dim=-1), whole) < 1e-6
    assert torch.equal(state, whole_state)


def test_conv_update_steps_equal_full_conv():
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 6, 10), torch.randn(6, 4), torch.randn(6)
    whole, whole_state = causal_conv1d_ref(x, w, b, activation="silu")
    state, ys = torch.zeros(3, 6, 3), []
    for t in range(10):
        y, state = causal_conv1d_update_ref(x[..., t], state, w, b, activation="silu")
        ys.append(y)
    assert rel_err(torch.stack(ys, dim=-1), whole) < 1e-6
    assert torch.equal(state, whole_state)


# ---- selective scan (Mamba-1) ----------------------------------------------------------------------------

def scan_inputs(batch=2, dim=6, dstate=5, length=13, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    return dict(
        u=r(batch, dim, length), delta=r(batch, dim, length),
        A=-torch.rand(dim, dstate, generator=g, dtype=dtype),
        B=r(batch, dstate, length), C=r(batch, dstate, length), D=r(dim), z=r(batch, dim, length),
        delta_bias=r(dim), initial_state=r(batch, dim, dstate),
    )


def test_selective_scan_ref_matches_elementwise_loop():
    """The spec (which computes in fp32) against the recurrence written one scalar at a time in fp64."""
    p = scan_inputs(batch=1, dim=3, dstate=2, length=6)
    y, state = selective_scan_ref(**p, delta_softplus=True)
    dt = F.softplus(p["delta"] + p["delta_bias"][:, None])
    h = p["initial_state"][0].clone()
    u, z, B, C, A = p["u"][0], p["z"][0], p["B"][0], p["C"][0], p["A"]
    for t in range(6):
        for d in range(3):
            out = 0.0
            for n in range(2):
                h[d, n] = torch.exp(dt[0, d, t] * A[d, n]) * h[d, n] + dt[0, d, t] * B[n, t] * u[d, t]
                out = out + h[d, n] * C[n, t]
            expected = (out + p["D"][d] * u[d, t]) * z[d, t] * torch.sigmoid(z[d, t])
            assert abs(y[0, d, t] - expected) < 1e-6 * (1 + abs(expected))
    assert rel_err(state[0], h) < 1e-6


@pytest.mark.parametrize(
    "shape", [(1, 1, 1, 1), (2, 6, 5, 13), (3, 7, 16, 33)], ids=lambda s: "B{}-D{}-N{}-T{}".format(*s)
)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
def test_selective_scan_cpu_path_equals_ref_with_gradients(shape, with_state):
    batch, dim, dstate, length = shape
    p = scan_inputs(batch, dim, dstate, length, dtype=torch.float32)
    if not with_state:
        p["initial_state"] = None
    names = [k for k, v in p.items() if v is not None]
    ins_a, ins_b = leaves(*(p[k] for k in names)), leaves(*(p[k] for k in names))
    out_a = selective_scan_cpu(**dict(zip(names, ins_a)), delta_softplus=True)
    out_b = selective_scan_ref(**dict(zip(names, ins_b)), delta_softplus=True)
    for a, b in zip(out_a, out_b):
        assert rel_err(a, b) < 1e-5
    for name, ga, gb in zip(names, grads(out_a, ins_a), grads(out_b, ins_b)):
        assert rel_err(ga, gb) < 1e-5, name


def test_selective_state_update_continues_the_scan():
    p = scan_inputs(dtype=torch.float32)
    y, state = selective_scan(**p, delta_softplus=True)
    y_head, state_head = selective_scan(**{**p, **{k: p[k][..., :9] for k in ("u", "delta", "B", "C", "z")}},
                                        delta_softplus=True)
    ys = [y_head]
    for t in range(9, 13):
        y_t, state_head = selective_state_update(
            state_head, p["u"][..., t], p["delta"][..., t], p["A"], p["B"][..., t], p["C"][..., t], p["D"],
            p["z"][..., t], p["delta_bias"], dt_softplus=True,
        )
        ys.append(y_t[..., None])
    assert rel_err(torch.cat(ys, dim=-1), y) < 1e-6
    assert rel_err(state_head, state) < 1e-6


# ---- SSD (Mamba-2) ---------------------------------------------------------------------------------------

def ssd_inputs(batch=2, length=37, heads=4, headdim=3, groups=2, dstate=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    return dict(
        x=r(batch, length, heads, headdim), dt=r(batch, length, heads),
        A=-torch.rand(heads, generator=g, dtype=dtype),
        B=r(batch, length, groups, dstate), C=r(batch, length, groups, dstate), D=r(heads), dt_bias=r(heads),
        initial_state=r(batch, heads, headdim, dstate),
    )


@pytest.mark.parametrize(
    "shape,chunk",
    # (batch, T, heads, headdim, groups, d_state), chunk
    [((1, 1, 1, 1, 1, 1), 4), ((2, 37, 4, 3, 2, 5), 8), ((2, 64, 6, 8, 3, 16), 16),
     ((1, 50, 8, 16, 1, 32), 64)],
    ids=["T1", "T37-c8-groups2", "T64-c16-groups3", "T50-c64-onechunk"],
)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
def test_ssd_chunked_equals_sequential_scan_with_gradients(shape, chunk, with_state):
    p = ssd_inputs(*shape)
    if not with_state:
        p["initial_state"] = None
    names = [k for k, v in p.items() if v is not None]
    ins_a, ins_b = leaves(*(p[k] for k in names)), leaves(*(p[k] for k in names))
    out_a = ssd_chunked(**dict(zip(names, ins_a)), chunk_size=chunk, dt_softplus=True)
    out_b = ssd_sequential_ref(**dict(zip(names, ins_b)), dt_softplus=True)
    for a, b in zip(out_a, out_b):
        assert rel_err(a, b) < 1e-5
    for name, ga, gb in zip(names, grads(out_a, ins_a), grads(out_b, ins_b)):
        assert rel_err(ga, gb) < 1e-5, name


def test_ssd_dt_limit_clamps_in_scan_and_step():
    p = ssd_inputs(length=9)
    limit = (0.05, 0.5)
    y, state = ssd_chunked(**p, chunk_size=4, dt_softplus=True, dt_limit=limit)
    dt = process_dt(p["dt"], p["dt_bias"], True, limit)
    assert dt.min() >= 0.05 and dt.max() <= 0.5
    y_seq, state_seq = ssd_sequential_ref(**p, dt_softplus=True, dt_limit=limit)
    assert rel_err(y, y_seq) < 1e-5 and rel_err(state, state_seq) < 1e-5
    y_free, _ = ssd_chunked(**p, chunk_size=4, dt_softplus=True)
    assert rel_err(y_free, y) > 1e-3  # the clamp is active on these inputs


# ---- mamba-ssm's and causal-conv1d's own references (optional, CPU stand-ins for their CUDA extensions) ----

@pytest.fixture
def mamba_ssm(monkeypatch):
    """mamba_ssm imported on the CPU: stand-ins for its compiled extensions, a no-op torch.cuda.device."""
    pytest.importorskip("einops", reason="mamba-ssm needs einops")
    for name in ("selective_scan_cuda", "causal_conv1d_cuda"):
        if name not in sys.modules:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setattr(torch.cuda, "device", lambda *a, **k: contextlib.nullcontext())
    module = pytest.importorskip(
        "mamba_ssm", reason="mamba-ssm is not installed (on CPU: MAMBA_SKIP_CUDA_BUILD=TRUE "
        "MAMBA_FORCE_BUILD=TRUE pip install --no-build-isolation --no-deps mamba-ssm==2.3.2.post1)"
    )
    # The Triton interpreter cannot benchmark autotune candidates: keep the first config of each kernel.
    from triton.runtime.autotuner import Autotuner

    for name, mod in list(sys.modules.items()):
        if name.startswith("mamba_ssm.ops.triton."):
            for kernel in vars(mod).values():
                if isinstance(kernel, Autotuner) and len(kernel.configs) > 1:
                    monkeypatch.setattr(kernel, "configs", kernel.configs[:1])
    return module


def test_selective_scan_matches_mamba_ssm_reference(mamba_ssm):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref as theirs

    p = scan_inputs(dtype=torch.float32)
    ours, ours_state = selective_scan(**{**p, "initial_state": None}, delta_softplus=True)
    ref, ref_state = theirs(**{k: v for k, v in p.items() if k != "initial_state"}, delta_softplus=True,
                            return_last_state=True)
    assert rel_err(ours, ref) < 1e-6 and rel_err(ours_state, ref_state) < 1e-6


def test_ssd_matches_mamba_ssm_minimal_ssd(mamba_ssm):
    from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete

    p = ssd_inputs(length=32, groups=1)
    y, state = ssd_chunked(**{**p, "D": None, "dt_bias": None, "initial_state": None}, chunk_size=8)
    # ssd_minimal_discrete takes x and A already multiplied by dt, B and C per head.
    dt = p["dt"]
    heads = p["x"].shape[2]
    per_head = (-1, -1, heads, -1)
    y_ref, state_ref = ssd_minimal_discrete(
        p["x"] * dt[..., None], p["A"] * dt, p["B"].expand(*per_head), p["C"].expand(*per_head), 8
    )
    assert rel_err(y, y_ref) < 1e-5 and rel_err(state, state_ref) < 1e-5


def test_ssd_cuda_call_through_mamba_ssm_triton_kernels(mamba_ssm):
    """Our call into mamba_chunk_scan_combined and the Triton step, run by the Triton interpreter on CPU."""
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update as triton_step
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    p = ssd_inputs(length=21, heads=4, headdim=4, groups=2, dstate=8)
    args = [p[k] for k in ("x", "dt", "A", "B", "C")]
    y, state = ssd_with(
        mamba_chunk_scan_combined, *args, 16, p["D"], p["dt_bias"], True, None, p["initial_state"]
    )
    y_ref, state_ref = ssd_sequential_ref(**p, dt_softplus=True)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(state, state_ref) < 1e-5
    first = [p[k][:, 0] for k in ("x", "dt")] + [p["A"]] + [p[k][:, 0] for k in ("B", "C")]
    step_args = (state_ref, *first, p["D"], p["dt_bias"], True)
    y_t, state_t = ssd_step_with(triton_step, *step_args)
    y_t_ref, state_t_ref = ssd_step_ref(*step_args)
    assert rel_err(y_t, y_t_ref) < 1e-5 and rel_err(state_t, state_t_ref) < 1e-5


def test_causal_conv_matches_causal_conv1d_reference(mamba_ssm):
    iface = pytest.importorskip("causal_conv1d.causal_conv1d_interface", reason="causal-conv1d not installed")
    torch.manual_seed(0)
    x, w, b, s0 = torch.randn(2, 5, 9), torch.randn(5, 4), torch.randn(5), torch.randn(2, 5, 3)
    y, state = causal_conv1d_ref(x, w, b, s0, activation="silu")
    y_ref, state_ref = iface.causal_conv1d_ref(x, w, b, s0, return_final_states=True, activation="silu")
    assert rel_err(y, y_ref) < 1e-6 and torch.equal(state, state_ref)
    conv_state = s0.clone()
    y_t_ref = iface.causal_conv1d_update_ref(x[..., 0], conv_state, w, b, activation="silu")
    y_t, state_t = causal_conv1d_update_ref(x[..., 0], s0, w, b, activation="silu")
    assert rel_err(y_t, y_t_ref) < 1e-6 and torch.equal(state_t, conv_state)


# ---- dispatch ---------------------------------------------------------------------------------------------

def op_calls():
    """Each dispatched op with small CPU inputs: name -> fn(backend)."""
    s, d = scan_inputs(dtype=torch.float32), ssd_inputs(length=9)
    x, w, state = torch.randn(2, 5, 9), torch.randn(5, 4), torch.zeros(2, 5, 3)
    one = lambda t: t[..., 0]
    return {
        "selective_scan": lambda be: selective_scan(**s, delta_softplus=True, backend=be),
        "selective_state_update": lambda be: selective_state_update(
            s["initial_state"], one(s["u"]), one(s["delta"]), s["A"], one(s["B"]), one(s["C"]), backend=be),
        "ssd": lambda be: ssd(**d, chunk_size=4, backend=be),
        "ssd_step": lambda be: ssd_step(
            d["initial_state"], d["x"][:, 0], d["dt"][:, 0], d["A"], d["B"][:, 0], d["C"][:, 0], backend=be),
        "causal_conv1d": lambda be: causal_conv1d(x, w, backend=be),
        "causal_conv1d_update": lambda be: causal_conv1d_update(x[..., 0], state, w, backend=be),
    }


@pytest.mark.parametrize("op", list(op_calls()))
@pytest.mark.parametrize("how", ["argument", "environment"])
def test_requesting_cuda_without_it_names_the_fix(op, how, monkeypatch):
    call = op_calls()[op]
    if how == "environment":
        monkeypatch.setenv(backend.BACKEND_ENV, "cuda")
    with pytest.raises(RuntimeError, match=r"pip install \.\[cuda\]") as err:
        call("cuda" if how == "argument" else None)
    assert op in str(err.value) and "reference" in str(err.value)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="not one of auto, cuda, reference"):
        op_calls()["ssd"]("triton")


@pytest.mark.parametrize("requested", [None, "auto", "reference"])
def test_cpu_tensors_take_the_reference_and_log_it_once(requested, monkeypatch, caplog):
    monkeypatch.setattr(backend, "_logged", set())
    caplog.set_level(logging.INFO, logger="kernels.backend")
    for op, call in op_calls().items():
        call(requested)
        call(requested)
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(op + " ")]
        assert lines == [f"{op} uses the PyTorch reference"], lines
