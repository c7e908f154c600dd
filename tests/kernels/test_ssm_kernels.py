"""SSM ops (mixer_kernels/selective_scan, mixer_kernels/ssd, mixer_kernels/causal_conv1d): references against each other,
against plain loops and F.conv1d, against mamba-ssm's and causal-conv1d's own references where installed,
and the dispatch (clear error for a CUDA path that cannot run, one log line per chosen path). CPU, fp32/fp64.
"""


import pytest
import torch
import torch.nn.functional as F

from mixer_kernels import backend
from mixer_kernels.causal_conv1d import causal_conv1d, causal_conv1d_update
from mixer_kernels.causal_conv1d.dispatch import conv_with
from mixer_kernels.causal_conv1d.reference import causal_conv1d_ref, causal_conv1d_update_ref
from mixer_kernels.selective_scan import selective_scan, selective_state_update
from mixer_kernels.selective_scan.dispatch import scan_with
from mixer_kernels.selective_scan.reference import selective_scan as selective_scan_cpu
from mixer_kernels.selective_scan.reference import selective_scan_ref
from mixer_kernels.ssd import ssd, ssd_step
from mixer_kernels.ssd.dispatch import ssd_step_with, ssd_with
from mixer_kernels.ssd.reference import process_dt, ssd_chunked, ssd_sequential_ref, ssd_step_ref


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


# Packed documents (models/documents.py): row 0 holds documents of 1, 15, 21 and 11 tokens (16 ends on a
# 16-token chunk boundary; the others divide no chunk size), row 1 is one document of the whole row.
DOC_LENGTHS, ROW = [1, 15, 21, 11, 48], 48
SEQ_IDX = torch.repeat_interleave(torch.arange(5, dtype=torch.int32), torch.tensor(DOC_LENGTHS)).view(2, ROW)
FIRST_DOCS = (0, 4)  # the documents an initial state belongs to (each row's first)


def each_document(t: torch.Tensor, time_dim: int = 1) -> list[torch.Tensor]:
    """(2, ROW, ...) (time at `time_dim`) -> each document alone, batch 1."""
    rows = t.movedim(time_dim, 1).flatten(0, 1).split(DOC_LENGTHS)
    return [d[None].movedim(1, time_dim) for d in rows]


def test_causal_conv_with_seq_idx_equals_each_document_alone(cuda_packages):
    """Reference conv with seq_idx against each document alone, and against causal-conv1d's own reference; the
    initial state feeds each row's first document only, the final state is the last document's."""
    torch.manual_seed(0)
    x, w, b, s0 = torch.randn(2, 5, ROW), torch.randn(5, 4), torch.randn(5), torch.randn(2, 5, 3)
    y, state = causal_conv1d_ref(x, w, b, s0, activation="silu", seq_idx=SEQ_IDX)
    alone = [causal_conv1d_ref(d, w, b, s0[[i // 4]] if i in FIRST_DOCS else None, activation="silu")
             for i, d in enumerate(each_document(x, time_dim=2))]
    expected = torch.cat([y_doc for y_doc, _ in alone], dim=-1)[0].unflatten(-1, (2, ROW)).transpose(0, 1)
    assert rel_err(y, expected) < 1e-6
    assert torch.equal(state[0], alone[3][1][0]) and torch.equal(state[1], alone[4][1][0])
    unpacked, _ = causal_conv1d_ref(x, w, b, s0, activation="silu")
    assert rel_err(unpacked, expected) > 1e-2  # the test can see a tap across a boundary
    from causal_conv1d.causal_conv1d_interface import causal_conv1d_ref as theirs

    assert rel_err(y, theirs(x, w, b, s0, activation="silu", seq_idx=SEQ_IDX)) < 1e-6


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


@pytest.mark.parametrize("chunk", [4, 16, 64])
def test_ssd_with_seq_idx_equals_each_document_alone(chunk):
    """The chunked SSD with seq_idx against the sequential spec run on each document alone: outputs, the last
    document's final state and every input's gradient; the initial state feeds each row's first document."""
    p = ssd_inputs(batch=2, length=ROW)
    names = list(p)
    ins_a, ins_b = leaves(*p.values()), leaves(*p.values())
    a = dict(zip(names, ins_a))
    y, state = ssd_chunked(**a, chunk_size=chunk, dt_softplus=True, seq_idx=SEQ_IDX)
    b = dict(zip(names, ins_b))
    per_doc = zip(*(each_document(b[k]) for k in ("x", "dt", "B", "C")), strict=True)
    alone = [ssd_sequential_ref(xd, dtd, b["A"], Bd, Cd, b["D"], b["dt_bias"], True, None,
                                b["initial_state"][[i // 4]] if i in FIRST_DOCS else None)
             for i, (xd, dtd, Bd, Cd) in enumerate(per_doc)]
    y_ref = torch.cat([y_doc for y_doc, _ in alone], dim=1).view_as(y)
    state_ref = torch.cat([alone[3][1], alone[4][1]])  # each row's last document
    assert rel_err(y, y_ref) < 1e-5 and rel_err(state, state_ref) < 1e-5
    for name, ga, gb in zip(names, grads((y, state), ins_a), grads((y_ref, state_ref), ins_b)):
        assert rel_err(ga, gb) < 1e-5, name
    unpacked, _ = ssd_chunked(**a, chunk_size=chunk, dt_softplus=True)
    assert rel_err(unpacked, y_ref) > 1e-2  # the test can see a state crossing a boundary


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


# ---- mamba-ssm's and causal-conv1d's own references (CPU stand-ins for their CUDA extensions) -----------

@pytest.fixture
def mamba_ssm(cuda_packages):
    pass


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
    x_t, dt_t, B_t, C_t = (p[k][:, 0] for k in ("x", "dt", "B", "C"))
    dt_t = process_dt(dt_t, p["dt_bias"], True, None)
    y_t, state_t = ssd_step_with(triton_step, state_ref, x_t, dt_t, p["A"], B_t, C_t, p["D"])
    y_t_ref, state_t_ref = ssd_step_ref(state_ref, x_t, dt_t, p["A"], B_t, C_t, p["D"])
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


# ---- dispatch (mixer_kernels/backend.py) and the fast-path calls, through stand-ins for the CUDA packages ------

def op_calls():
    """Each dispatched op with small CPU inputs: name -> call."""
    s, d = scan_inputs(dtype=torch.float32), ssd_inputs(length=9)
    x, w, state = torch.randn(2, 5, 9), torch.randn(5, 4), torch.zeros(2, 5, 3)
    one = lambda t: t[..., 0]
    return {
        "selective_scan": lambda: selective_scan(**s, delta_softplus=True),
        "selective_state_update": lambda: selective_state_update(
            s["initial_state"], one(s["u"]), one(s["delta"]), s["A"], one(s["B"]), one(s["C"])),
        "ssd": lambda: ssd(**d, chunk_size=4),
        "ssd_step": lambda: ssd_step(
            d["initial_state"], d["x"][:, 0], d["dt"][:, 0], d["A"], d["B"][:, 0], d["C"][:, 0]),
        "causal_conv1d": lambda: causal_conv1d(x, w),
        "causal_conv1d_update": lambda: causal_conv1d_update(x[..., 0], state, w),
    }


@pytest.mark.parametrize("op", list(op_calls()))
@pytest.mark.parametrize("how", ["config", "environment"])
@pytest.mark.parametrize("installed", [False, True], ids=["package-missing", "cpu-tensors"])
def test_asking_for_the_fast_path_that_cannot_run_names_the_fix(op, how, installed, monkeypatch):
    call = op_calls()[op]
    if not installed:  # as on a machine without the cuda extra (or with a wheel built for another torch)
        monkeypatch.setattr(backend, "_fast_path_unavailable", lambda spec: "ImportError: not installed")
    else:
        monkeypatch.setattr(backend, "_fast_path_unavailable", lambda spec: "")
    if how == "environment":
        monkeypatch.setenv(backend.ENV, f"{op}=fast")
    fix = r"pip install \.\[cuda\]" if not installed else "tensors are on cpu.*move the model to a CUDA device"
    with backend.using(overrides={op: "fast"} if how == "config" else None):
        with pytest.raises(backend.KernelFallbackError, match=fix) as err:
            call()
    assert op in str(err.value) and f"{op}=reference" in str(err.value)


@pytest.mark.parametrize("mode", ["auto", "reference"])
def test_cpu_tensors_take_the_reference(mode, monkeypatch):
    monkeypatch.setenv(backend.ENV, mode)
    backend.reset_for_tests()
    for op, call in op_calls().items():
        call()
        assert backend.plan(op, "cpu").path == "reference"
    assert backend.ops_seen() == set(op_calls())


def mamba_scan_stand_in(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_last_state=False):
    """mamba-ssm's selective_scan_fn contract on the CPU: always from a zero state (it takes none)."""
    out, last = selective_scan_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last) if return_last_state else out


def test_selective_scan_with_an_initial_state_takes_the_fast_path():
    """Formerly a quiet fallback: the CUDA scan starts from zeros, the initial state's part is added."""
    p = leaves(*scan_inputs(dtype=torch.float64).values())
    kw = dict(zip(scan_inputs().keys(), p))
    ref, ref_state = selective_scan_ref(**kw, delta_softplus=True)
    out, state = scan_with(mamba_scan_stand_in, *(kw[k] for k in ("u", "delta", "A", "B", "C", "D", "z",
                                                                  "delta_bias")), True, kw["initial_state"])
    # Both compute in fp32 (the reference does for any input): measured 1.3e-7.
    assert rel_err(out, ref) < 1e-6 and rel_err(state, ref_state) < 1e-6
    for a, b in zip(grads([out, state], p), grads([ref, ref_state], p)):
        assert rel_err(a, b) < 1e-6


def mamba_state_update_stand_in(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """mamba-ssm's Triton selective_state_update contract (its selective_state_update_ref, multi-head form):
    per-channel dt, A, D, dt_bias; the state updated in place; no dt clamp."""
    dt = dt + dt_bias
    dt = F.softplus(dt) if dt_softplus else dt
    heads_per_group = x.shape[1] // B.shape[1]
    B, C = (t.repeat_interleave(heads_per_group, dim=1) for t in (B, C))  # (B, H, N)
    state.copy_(state * torch.exp(dt[..., None] * A) + (dt * x)[..., None] * B[:, :, None])
    return (state * C[:, :, None]).sum(-1) + (0 if D is None else D * x)


def test_ssd_step_with_a_dt_clamp_takes_the_fast_path():
    """Formerly a quiet fallback: the Triton step has no dt clamp, so it gets dt already processed."""
    p = ssd_inputs(length=1, dtype=torch.float64)
    limit = (0.05, 0.5)
    args = [p["initial_state"], p["x"][:, 0], p["dt"][:, 0], p["A"], p["B"][:, 0], p["C"][:, 0], p["D"]]
    y_ref, state_ref = ssd_step_ref(*args, p["dt_bias"], True, limit)
    dt = process_dt(p["dt"][:, 0], p["dt_bias"], True, limit)
    assert (dt == limit[0]).any() or (dt == limit[1]).any()  # the clamp is exercised
    state_in = args[0].clone()
    y, state = ssd_step_with(mamba_state_update_stand_in, args[0], args[1], dt, *args[3:])
    assert rel_err(y, y_ref) < 1e-6 and rel_err(state, state_ref) < 1e-6  # fp32 in the reference
    assert torch.equal(args[0], state_in)  # the caller's state is untouched


def mamba_chunk_scan_stand_in(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                              return_final_states=False, return_varlen_states=False):
    """mamba-ssm 2.3.2's mamba_chunk_scan_combined contract: its final state comes back in C's dtype."""
    limit = None if dt_limit == (0.0, float("inf")) else dt_limit
    y, state = ssd_chunked(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, limit, initial_states)
    return y, state.to(C.dtype)


def test_mamba2_final_state_is_fp32_on_the_fast_path():
    """A prefill (no autograd) gets the final state in fp32 from mamba-ssm 2.3.2, whose kernel rounds it to C's
    dtype; a later release is asked for fp32 (state_dtype)."""
    p = ssd_inputs(length=40, dtype=torch.float32)
    half = {k: p[k].to(torch.bfloat16) for k in ("x", "B", "C")}
    args = [half["x"], p["dt"], p["A"], half["B"], half["C"], 16, p["D"], p["dt_bias"], True, (0.01, 2.0),
            p["initial_state"]]
    with torch.no_grad():
        _, state = ssd_with(mamba_chunk_scan_stand_in, *args)
    _, state_ref = ssd_chunked(*[a.float() if torch.is_tensor(a) else a for a in args])
    # Summed directly vs by chunks, both fp32: 1e-6; a bf16-rounded state is 1.6e-3 off.
    assert state.dtype == torch.float32 and rel_err(state, state_ref) < 1e-5

    calls = []

    def newer(*a, state_dtype=None, **kw):  # a release that takes state_dtype gets asked for fp32
        calls.append(state_dtype)
        return mamba_chunk_scan_stand_in(*a, **kw)

    ssd_with(newer, *args)
    assert calls == [torch.float32]


def test_mamba2_fp32_final_state_keeps_its_digits_at_long_sequences():
    """The decay from each token to the end is a suffix sum: total minus prefix cancels digits (3e-5 here)."""
    from mixer_kernels.ssd.dispatch import final_state_fp32

    p = ssd_inputs(batch=1, length=8192, heads=2, headdim=4, groups=1, dstate=4, dtype=torch.float32)
    dt = process_dt(p["dt"], None, True, None)
    state = final_state_fp32(p["x"], dt, p["A"], p["B"], None)
    _, exact = ssd_chunked(*(p[k].double() for k in ("x", "dt", "A", "B", "C")), 64, dt_softplus=True)
    assert rel_err(state, exact) < 1e-6  # measured 4e-8


def causal_conv1d_stand_in(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                           final_states_out=None, activation=None):
    """causal-conv1d's causal_conv1d_fn with the layout checks of its CUDA code (csrc/causal_conv1d.cpp)."""
    channel_last = x.stride(1) == 1 and x.stride(2) > 1
    assert x.stride(2) == 1 or x.stride(1) == 1
    assert 2 <= weight.shape[1] <= 4, "causal_conv1d only supports width between 2 and 4"
    if channel_last:
        assert x.shape[1] % 8 == 0, "causal_conv1d only supports channel dimension divisible by 8 for now"
        assert x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0, "channel last layout requires strides multiples of 8"
    if initial_states is not None or return_final_states:
        assert channel_last, "initial_states / final_states are only supported for channel last layout"
    if initial_states is not None:
        assert initial_states.dtype == x.dtype and initial_states.stride(1) == 1
    y, state = causal_conv1d_ref(x, weight, bias, initial_states, activation)
    return (y, state) if return_final_states else y


@pytest.mark.parametrize("channels,width,inner", [(2176, 4, 4126), (60, 3, 120), (16, 2, 16)],
                         ids=["mamba2-30-heads", "channels-not-x8", "contiguous"])
def test_causal_conv_fast_call_meets_the_packages_layout_rules(channels, width, inner):
    """The conv input is re-laid-out as needed: xBC of a Mamba-2 with 30 heads (d_model 960) is a slice of
    in_proj's output whose row stride (4126) is not a multiple of 8; other widths are padded to 8 channels."""
    torch.manual_seed(0)
    proj = torch.randn(2, 9, inner)  # (B, T, in_proj width): the conv reads channels [0, channels)
    x = proj[..., :channels].transpose(1, 2)  # (B, C, T), channel-last view
    w, b, s0 = torch.randn(channels, width), torch.randn(channels), torch.randn(2, channels, width - 1)
    y, state = conv_with(causal_conv1d_stand_in, x, w, b, s0, "silu")
    y_ref, state_ref = causal_conv1d_ref(x, w, b, s0, activation="silu")
    assert y.shape == y_ref.shape and rel_err(y, y_ref) < 1e-6 and torch.equal(state, state_ref)


def test_a_mamba2_with_30_heads_validates():
    from models import ModelConfig

    cfg = ModelConfig(vocab_size=64, d_model=960, n_layers=1, n_heads=30, mixer="mamba2")
    with torch.device("meta"):
        from models import CausalLM

        mixer = CausalLM(cfg).blocks[0].mixer
    assert mixer.n_heads == 30 and mixer.in_proj.out_features % 8  # the stride the conv must not trip on
