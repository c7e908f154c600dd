"""Every call our dispatchers make into mamba-ssm, causal-conv1d and flash-attn, through the installed packages'
real Python wrappers and autograd Functions on the CPU (tests/cuda_standins.py stands in for their compiled
extensions only), forward and backward, against our references and the packages' own."""

import pytest
import torch

from mixer_kernels.attention.dispatch import flash_packed, flash_with
from mixer_kernels.attention.reference import attention_ref
from mixer_kernels.causal_conv1d.dispatch import conv_with
from mixer_kernels.causal_conv1d.reference import causal_conv1d_ref, causal_conv1d_update_ref
from mixer_kernels.selective_scan import reference as scan_reference
from mixer_kernels.selective_scan.dispatch import scan_with
from mixer_kernels.ssd.dispatch import ssd_step_with, ssd_with
from mixer_kernels.ssd.reference import process_dt, ssd_chunked, ssd_step_ref

pytestmark = pytest.mark.usefixtures("cuda_packages")


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def grads(outputs, inputs, seed=0):
    """Gradients of a fixed random projection of the outputs, for the inputs that are not None."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outputs)
    return torch.autograd.grad(loss, [i for i in inputs if i is not None])


def randn(*shape, seed=[0]):  # noqa: B006 - a counter: every call draws new numbers
    seed[0] += 1
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0]))


# ---- mamba-ssm ---------------------------------------------------------------------------------------------

def scan_inputs(batch=2, dim=16, dstate=8, length=33):
    return dict(u=randn(batch, dim, length), delta=randn(batch, dim, length) * 0.5, A=-torch.rand(dim, dstate) - 0.2,
                B=randn(batch, dstate, length), C=randn(batch, dstate, length), D=randn(dim), z=randn(batch, dim, length),
                delta_bias=randn(dim) * 0.1)


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
def test_selective_scan_fn(with_state):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn, selective_scan_ref

    p = scan_inputs()
    h0 = randn(2, 16, 8) if with_state else None
    args = leaves(*p.values())
    out, state = scan_with(selective_scan_fn, *args, True, h0)
    ref_args = leaves(*p.values())
    ref, ref_state = scan_reference.selective_scan(*ref_args, True, h0)
    # fp32 everywhere: measured 2e-7; mamba-ssm's Function gives no gradient through the final state
    assert rel(out, ref) < 2e-6 and rel(state, ref_state) < 2e-6
    for a, b in zip(grads([out], args), grads([ref], ref_args)):
        assert rel(a, b) < 2e-6
    if not with_state:
        theirs, theirs_state = selective_scan_ref(*[t.detach() for t in args], True, return_last_state=True)
        assert rel(out, theirs) < 1e-6 and rel(state, theirs_state) < 1e-6


def test_selective_state_update_mamba1():
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update, selective_state_update_ref

    b, d, n = 2, 16, 8
    state, x, dt, z = randn(b, d, n), randn(b, d), randn(b, d) * 0.5, randn(b, d)
    A, B, C, D, dt_bias = -torch.rand(d, n), randn(b, n), randn(b, n), randn(d), randn(d) * 0.1
    ours_state = state.clone()
    y = selective_state_update(ours_state, x, dt, A, B, C, D, z, dt_bias, True)  # the dispatcher's call
    y_ref, state_ref = scan_reference.selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, True)
    theirs_state = state.clone()
    y_theirs = selective_state_update_ref(theirs_state, x, dt, A, B, C, D, z, dt_bias, True)
    assert rel(y, y_ref) < 1e-6 and rel(ours_state, state_ref) < 1e-6
    assert rel(y, y_theirs) < 1e-6 and rel(ours_state, theirs_state) < 1e-6


def ssd_inputs(batch=2, length=40, heads=4, headdim=8, groups=2, dstate=16):
    return dict(x=randn(batch, length, heads, headdim), dt=randn(batch, length, heads), A=-torch.rand(heads) - 0.5,
                B=randn(batch, length, groups, dstate), C=randn(batch, length, groups, dstate), D=randn(heads),
                dt_bias=randn(heads) * 0.1)


@pytest.mark.parametrize("dt_limit", [None, (0.05, 1.0)], ids=["no-clamp", "dt-limit"])
def test_mamba_chunk_scan_combined(dt_limit):
    """mamba-ssm's Triton SSD under TRITON_INTERPRET=1 (fp32), with an initial state; the final state in fp32."""
    from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    p, h0 = ssd_inputs(), randn(2, 4, 8, 16)
    names = ["x", "dt", "A", "B", "C"]
    args = leaves(*(p[k] for k in names), p["D"], p["dt_bias"], h0)
    y, state = ssd_with(mamba_chunk_scan_combined, *args[:5], 16, args[5], args[6], True, dt_limit, args[7])
    ref_args = leaves(*(p[k] for k in names), p["D"], p["dt_bias"], h0)
    y_ref, state_ref = ssd_chunked(*ref_args[:5], 16, ref_args[5], ref_args[6], True, dt_limit, ref_args[7])
    assert state.dtype == torch.float32
    assert rel(y, y_ref) < 2e-6 and rel(state, state_ref) < 1e-5  # measured 1e-7 and 2e-6 (fp32, other order)
    for a, b in zip(grads([y], args), grads([y_ref], ref_args)):
        assert rel(a, b) < 2e-5  # measured up to 2e-6 (dA sums over every token)
    if dt_limit is None:  # mamba-ssm's own minimal SSD: x and A times dt, B and C per head, zero state
        dt = process_dt(p["dt"], p["dt_bias"], True, None)
        heads = lambda t: t.repeat_interleave(2, dim=2)  # noqa: E731 - groups to heads
        y0, s0 = ssd_with(mamba_chunk_scan_combined, p["x"], p["dt"], p["A"], p["B"], p["C"], 16, None, p["dt_bias"],
                          True, None, None)
        y_min, s_min = ssd_minimal_discrete(p["x"] * dt[..., None], p["A"] * dt, heads(p["B"]), heads(p["C"]), 8)
        assert rel(y0, y_min) < 1e-5 and rel(s0, s_min) < 1e-5


# Packed documents: row 0 holds documents of 1, 15 (ending on a 16-token chunk boundary), 21 and 11 tokens
# (no chunk size divides them), row 1 is one document; seq_idx is each token's document (models/documents.py).
DOC_LENGTHS, ROW = [1, 15, 21, 11, 48], 48
SEQ_IDX = torch.repeat_interleave(torch.arange(len(DOC_LENGTHS), dtype=torch.int32),
                                  torch.tensor(DOC_LENGTHS)).view(2, ROW)


def each_document(t: torch.Tensor) -> list[torch.Tensor]:
    """(2, ROW, ...) -> each document alone, (1, length, ...)."""
    return [d[None] for d in t.flatten(0, 1).split(DOC_LENGTHS)]


def test_packed_documents_through_mamba_chunk_scan_combined():
    """mamba-ssm's Triton SSD with seq_idx (TRITON_INTERPRET=1, fp32): each document as if alone, forward and
    backward, against our chunked reference run on each document by itself."""
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    p = ssd_inputs(length=ROW)
    names = ["x", "dt", "A", "B", "C", "D", "dt_bias"]
    args = leaves(*(p[k] for k in names))
    x, dt, A, B, C, D, dt_bias = args
    y, _ = ssd_with(mamba_chunk_scan_combined, x, dt, A, B, C, 16, D, dt_bias, True, None, None, SEQ_IDX)
    ref_args = leaves(*(p[k] for k in names))
    xr, dtr, Ar, Br, Cr, Dr, dt_bias_r = ref_args
    alone = [ssd_chunked(*doc, Ar, Bd, Cd, 16, Dr, dt_bias_r, True)[0]
             for *doc, Bd, Cd in zip(each_document(xr), each_document(dtr), each_document(Br), each_document(Cr))]
    y_ref = torch.cat(alone, dim=1).view_as(y)
    assert rel(y, y_ref) < 3e-6  # measured 2.6e-7
    for a, b in zip(grads([y], args), grads([y_ref], ref_args)):
        assert rel(a, b) < 3e-6  # measured <= 2.9e-7
    unpacked, _ = ssd_with(mamba_chunk_scan_combined, *(t.detach() for t in args[:5]), 16, D, dt_bias, True, None,
                           None)
    assert rel(unpacked, y_ref) > 1e-2  # without seq_idx the documents leak: the test can see it


def test_ssd_step_through_selective_state_update():
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update

    p = ssd_inputs(length=1)
    state = randn(2, 4, 8, 16)
    x, dt, B, C = (p[k][:, 0] for k in ("x", "dt", "B", "C"))
    for limit in (None, (0.05, 0.5)):
        y, new = ssd_step_with(selective_state_update, state, x, process_dt(dt, p["dt_bias"], True, limit), p["A"],
                               B, C, p["D"])
        y_ref, new_ref = ssd_step_ref(state, x, dt, p["A"], B, C, p["D"], p["dt_bias"], True, limit)
        assert rel(y, y_ref) < 1e-6 and rel(new, new_ref) < 1e-6


# ---- causal-conv1d -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels,width,row,with_state", [
    (2176, 4, 4126, True),  # xBC of a Mamba-2 with 30 heads: its in_proj row (4126) is no multiple of 8
    (60, 3, 120, True),  # channels not a multiple of 8: padded
    (16, 2, 16, False),  # channel-last and contiguous already
], ids=["mamba2-30-heads", "channels-60", "contiguous"])
def test_causal_conv1d_fn(channels, width, row, with_state):
    from causal_conv1d import causal_conv1d_fn
    from causal_conv1d.causal_conv1d_interface import causal_conv1d_ref as theirs

    proj = randn(2, 9, row)
    x = proj[..., :channels].transpose(1, 2)  # (B, C, T) view of a (B, T, row) projection, as the mixers pass
    w, b = randn(channels, width), randn(channels)
    s0 = randn(2, channels, width - 1) if with_state else None
    args = leaves(x, w, b)
    y, state = conv_with(causal_conv1d_fn, *args, s0, "silu")
    ref_args = leaves(x, w, b)
    y_ref, state_ref = causal_conv1d_ref(*ref_args, s0, activation="silu")
    y_theirs, state_theirs = theirs(x, w, b, s0, return_final_states=True, activation="silu")
    assert rel(y, y_ref) < 1e-6 and torch.equal(state, state_ref) and rel(y, y_theirs) < 1e-6
    assert torch.equal(state, state_theirs)
    for a, b_ in zip(grads([y, state], args), grads([y_ref, state_ref], ref_args)):
        assert rel(a, b_) < 1e-6


@pytest.mark.parametrize("channels", [16, 60])
def test_packed_documents_through_causal_conv1d_fn(channels):
    """causal-conv1d with seq_idx (channel-last, as its kernel requires): no tap crosses a boundary, forward
    and backward, against the package's own reference and our reference on each document alone; the state
    is the last document's."""
    from causal_conv1d import causal_conv1d_fn
    from causal_conv1d.causal_conv1d_interface import causal_conv1d_ref as theirs

    x = randn(2, ROW, channels).transpose(1, 2)  # (B, C, T) channel-last view, as the mixers pass
    w, b = randn(channels, 4), randn(channels)
    args = leaves(x, w, b)
    y, state = conv_with(causal_conv1d_fn, *args, None, "silu", SEQ_IDX)
    assert rel(y, theirs(x, w, b, activation="silu", seq_idx=SEQ_IDX)) < 1e-6
    ref_args = leaves(x, w, b)
    docs = [causal_conv1d_ref(d.transpose(1, 2), *ref_args[1:], activation="silu")  # each (1, C, length)
            for d in each_document(ref_args[0].transpose(1, 2))]
    y_ref = torch.cat([y_doc for y_doc, _ in docs], dim=-1)[0].unflatten(-1, (2, ROW)).transpose(0, 1)
    assert rel(y, y_ref) < 1e-6
    assert torch.equal(state[1], docs[-1][1][0]) and torch.equal(state[0], docs[-2][1][0])
    for a, b_ in zip(grads([y], args), grads([y_ref], ref_args)):
        assert rel(a, b_) < 1e-6


def test_causal_conv1d_update():
    from causal_conv1d import causal_conv1d_update
    from causal_conv1d.causal_conv1d_interface import causal_conv1d_update_ref as theirs

    x, state, w, b = randn(2, 24), randn(2, 24, 3), randn(24, 4), randn(24)
    ours_state = state.clone()
    y = causal_conv1d_update(x, ours_state, w, b, "silu")  # the dispatcher's call (on its own copy)
    y_ref, state_ref = causal_conv1d_update_ref(x, state, w, b, activation="silu")
    theirs_state = state.clone()
    y_theirs = theirs(x, theirs_state, w, b, "silu")
    assert rel(y, y_ref) < 1e-6 and torch.equal(ours_state, state_ref)
    assert rel(y, y_theirs) < 1e-6 and torch.equal(ours_state, theirs_state)


# ---- flash-attn ----------------------------------------------------------------------------------------------

ATTENTION_CASES = {  # name -> (Tq, q_offset, heads, kv heads, head dim, window, block_size, cu_seqlens)
    "causal": (37, 0, 4, 4, 16, None, None, None),
    "gqa-key-prefix": (9, 12, 4, 2, 24, None, None, None),  # BST's context keys; decoding with a cache
    "window": (50, 0, 4, 2, 16, 7, None, None),
    "blocks": (48, 0, 2, 2, 16, None, 16, None),  # varlen: block starts are the boundaries
    "documents-and-window": (40, 0, 2, 1, 16, 5, None, [0, 13, 29, 40]),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_flash_attention_through_the_package(case):
    """bf16 (flash-attn takes half precision only) against our fp32 reference fed the same rounded inputs."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    tq, offset, h, hkv, d, window, block, docs = ATTENTION_CASES[case]
    q, k, v = (t.to(torch.bfloat16) for t in (randn(2, h, tq, d), randn(2, hkv, tq + offset, d),
                                              randn(2, hkv, tq + offset, d)))
    cu = None if docs is None else torch.tensor(docs, dtype=torch.int32)
    fn = flash_attn_varlen_func if block is not None or cu is not None else flash_attn_func
    args = leaves(q, k, v)
    out = flash_with(fn, *args, window, block, cu)
    ref_args = leaves(*(t.float() for t in (q, k, v)))
    ref = attention_ref(*ref_args, offset, window, block, cu)
    assert out.dtype == torch.bfloat16 and rel(out, ref) < 1e-2  # bf16 output rounding: measured 1.6e-3
    for a, b in zip(grads([out], args), grads([ref], ref_args)):
        assert rel(a, b) < 2e-2  # bf16 gradients: measured up to 3e-3; a wrong mask is off by 0.1 or more


@pytest.mark.parametrize("window", [None, 5])
def test_packed_documents_through_flash_attn_varlen(window):
    """Each row its own document layout (models/documents.py): flash-attn's varlen kernel over the flattened
    tokens against our per-document reference, in bf16 as above."""
    from flash_attn import flash_attn_varlen_func

    from mixer_kernels.attention.reference import packed_attention_ref

    cu = torch.tensor([0, 1, 16, 37, 48, 96], dtype=torch.int32)  # a 1-token document; 48..96: a whole row
    q, k, v = (randn(96, h, 16).to(torch.bfloat16) for h in (4, 2, 2))
    args = leaves(q, k, v)
    out = flash_packed(flash_attn_varlen_func, *args, cu, 48, window)
    ref_args = leaves(*(t.float() for t in (q, k, v)))
    ref = packed_attention_ref(*ref_args, cu, window)
    assert out.dtype == torch.bfloat16 and rel(out, ref) < 1e-2
    for a, b in zip(grads([out], args), grads([ref], ref_args)):
        assert rel(a, b) < 2e-2
