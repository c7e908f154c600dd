"""Tests of mixer_kernels/gla: recurrence -> chunk reference -> Triton chunk kernel, forward and backward, and
agreement with flash-linear-attention's naive GLA (an external reference) when it is installed.

The Triton kernels run under TRITON_INTERPRET=1 on the CPU (set by tests/conftest.py before triton loads).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mixer_kernels.gla import gla_step, reference  # noqa: E402


def rel_rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, the closeness measure of flash-linear-attention's kernel tests."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(B, T, H, K, V, *, seed=0, decay_bias=2.0, with_state=True, requires_grad=False):
    """HGRN2-like inputs: g = logsigmoid(forget preactivation), k = 1 - exp(g) in [0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    g = F.logsigmoid(decay_bias + 2.0 * torch.randn(B, T, H, K, generator=gen))
    k = 1 - g.exp()
    v = torch.randn(B, T, H, V, generator=gen)
    h0 = torch.randn(B, H, K, V, generator=gen) if with_state else None
    xs = [q, k, v, g] + ([h0] if with_state else [])
    if requires_grad:
        for x in xs:
            x.requires_grad_()
    return q, k, v, g, h0


# The chunk references run in blocks of 3 chunks here (blocks of 2**20 elements are longer than these tests),
# so every shape with more than 3 chunks hands the state from block to block.
SHAPES = [(1, 16, 16, 16), (63, 24, 20, 16), (37, 7, 40, 32), (64, 32, 33, 16), (75, 8, 12, 4)]


@pytest.mark.parametrize("T,K,V,L", SHAPES, ids=[f"T{t}-K{k}-V{v}-L{c}" for t, k, v, c in SHAPES])
def test_chunk_reference_matches_recurrence(T, K, V, L, monkeypatch):
    monkeypatch.setattr(reference, "BLOCK_ELEMENTS", 3 * 2 * 2 * L * L * K)  # blocks of 3 chunks at B = H = 2
    q, k, v, g, h0 = make_inputs(2, T, 2, K, V)
    o_rec, s_rec = reference.gla_recurrent(q, k, v, g, initial_state=h0)
    o_chunk, s_chunk = reference.gla_chunk(q, k, v, g, initial_state=h0, chunk_size=L)
    assert rel_rmse(o_chunk, o_rec) < 1e-5
    assert rel_rmse(s_chunk, s_rec) < 1e-5


def test_chunk_reference_survives_strong_decay():
    """Forget gates near 0 (log decay -30 per step): factoring exp(b_t) exp(-b_s) would overflow."""
    q, k, v, _, h0 = make_inputs(1, 40, 2, 16, 16)
    g = torch.full_like(q, -30.0)
    o_rec, s_rec = reference.gla_recurrent(q, k, v, g, initial_state=h0)
    o_chunk, s_chunk = reference.gla_chunk(q, k, v, g, initial_state=h0, chunk_size=32)
    assert torch.isfinite(o_chunk).all() and rel_rmse(o_chunk, o_rec) < 1e-5 and rel_rmse(s_chunk, s_rec) < 1e-5


def test_step_continues_a_chunk():
    """Prefill with the chunk form, then decode with steps == the recurrence over the whole sequence."""
    q, k, v, g, h0 = make_inputs(2, 20, 2, 12, 10)
    o_all, s_all = reference.gla_recurrent(q, k, v, g, initial_state=h0)
    o_pre, state = reference.gla_chunk(q[:, :15], k[:, :15], v[:, :15], g[:, :15], initial_state=h0, chunk_size=8)
    outs = [o_pre]
    for t in range(15, 20):
        o_t, state = gla_step(q[:, t], k[:, t], v[:, t], g[:, t], state)
        outs.append(o_t[:, None])
    assert rel_rmse(torch.cat(outs, 1), o_all) < 1e-5 and rel_rmse(state, s_all) < 1e-5


def test_reference_matches_fla_naive():
    """Our recurrence and chunk form against flash-linear-attention's naive_recurrent_gla (same layout)."""
    naive = pytest.importorskip("fla.ops.gla.naive", reason="flash-linear-attention not installed")
    q, k, v, g, h0 = make_inputs(2, 45, 3, 20, 24)
    o_fla, s_fla = naive.naive_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    for o, s in (reference.gla_recurrent(q, k, v, g, initial_state=h0),
                 reference.gla_chunk(q, k, v, g, initial_state=h0, chunk_size=16)):
        assert rel_rmse(o, o_fla) < 1e-5
        assert rel_rmse(s, s_fla) < 1e-5


# ---------------------------------------------------------------------------------------------------
# Triton kernel (interpreter on the CPU)
# ---------------------------------------------------------------------------------------------------


KERNEL_SHAPES = [(63, 24, 20, True), (16, 16, 16, False), (40, 40, 33, True)]
# fp32: measured up to 6e-7 (outputs, states, gradients); fp16 inputs against fp32 on the same rounded
# values: measured up to 3e-4 (the fp16 output and gradient rounding).
TOLERANCE = {torch.float32: 5e-6, torch.float16: 3e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T,K,V,with_state", KERNEL_SHAPES,
                         ids=[f"T{t}-K{k}-V{v}-{'h0' if s else 'nostate'}" for t, k, v, s in KERNEL_SHAPES])
def test_triton_matches_reference_forward_and_backward(T, K, V, with_state, dtype, nan_buffers):
    from mixer_kernels.gla.triton import chunk_gla_triton

    q, k, v, g, h0 = make_inputs(2, T, 2, K, V, with_state=with_state)
    q, k, v = (x.to(dtype).float() for x in (q, k, v))  # the values the half kernel sees, in fp32
    ref_in = [x.clone().requires_grad_() if x is not None else None for x in (q, k, v, g, h0)]
    o_ref, s_ref = reference.gla_recurrent(*ref_in[:4], initial_state=ref_in[4])
    tri_in = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)] + [
        x.detach().clone().requires_grad_() if x is not None else None for x in (g, h0)]
    o_tri, s_tri = chunk_gla_triton(*tri_in[:4], initial_state=tri_in[4], chunk_size=16)
    tol = TOLERANCE[dtype]
    assert o_tri.dtype == dtype and rel_rmse(o_tri, o_ref) < tol and rel_rmse(s_tri, s_ref) < tol
    gen = torch.Generator().manual_seed(1)
    do, ds = torch.randn(o_ref.shape, generator=gen), torch.randn(s_ref.shape, generator=gen)
    grads_ref = torch.autograd.grad((o_ref * do).sum() + (s_ref * ds).sum(), [x for x in ref_in if x is not None])
    grads_tri = torch.autograd.grad((o_tri.float() * do).sum() + (s_tri * ds).sum(),
                                    [x for x in tri_in if x is not None])
    for name, a, b in zip("q k v g h0".split(), grads_tri, grads_ref):
        assert rel_rmse(a, b) < tol, name


def test_triton_survives_strong_decay():
    from mixer_kernels.gla.triton import chunk_gla_triton

    q, k, v, _, h0 = make_inputs(1, 32, 1, 16, 16)
    g = torch.full_like(q, -40.0)
    o_tri, s_tri = chunk_gla_triton(q, k, v, g, initial_state=h0)
    o_ref, s_ref = reference.gla_recurrent(q, k, v, g, initial_state=h0)
    assert torch.isfinite(o_tri).all() and rel_rmse(o_tri, o_ref) < 5e-6


def test_triton_rejects_bad_inputs():
    from mixer_kernels.gla.triton import chunk_gla_triton

    q, k, v, g, _ = make_inputs(1, 8, 1, 16, 16)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_gla_triton(q, k, v, g, chunk_size=24)
    with pytest.raises(ValueError, match="v must be"):
        chunk_gla_triton(q, k, v[:, :4], g)
    with pytest.raises(ValueError, match="dtype"):
        chunk_gla_triton(q, k, v.double(), g)


def test_aot_specs_cover_every_kernel_and_dtype():
    from mixer_kernels.gla import triton as gla_triton

    names = {(s["name"], s["dtype"]) for s in gla_triton.AOT_KERNELS}
    kernels = {"_gla_fwd_kernel", "_gla_bwd_dstates_kernel", "_gla_bwd_chunk_kernel"}
    assert names == {(n, d) for n in kernels for d in ("fp32", "bf16", "fp16")}
    assert {s["constexprs"]["K"] for s in gla_triton.AOT_KERNELS} >= {128, 256}  # HGRN2's and MoM's gla heads
    for spec in gla_triton.AOT_KERNELS:
        assert set(spec["signature"]) == set(spec["fn"].arg_names)
