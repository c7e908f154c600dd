"""Tests of mixer_kernels/delta_rule: recurrence -> WY chunk reference -> Triton chunk kernel, forward and
backward, and agreement with flash-linear-attention's naive gated delta rule (an external reference).

The Triton kernels run under TRITON_INTERPRET=1 on the CPU (set by tests/conftest.py before triton loads).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mixer_kernels.delta_rule import delta_rule_step, reference  # noqa: E402


def rel_rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, the closeness measure of flash-linear-attention's kernel tests."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(B, T, H, K, V, *, seed=0, with_state=True, requires_grad=False):
    """Gated-DeltaNet-like inputs: L2-normalised q and k, beta = sigmoid, g = logsigmoid."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    g = F.logsigmoid(2.0 + torch.randn(B, T, H, generator=gen))
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen))
    h0 = torch.randn(B, H, K, V, generator=gen) if with_state else None
    if requires_grad:
        for x in (q, k, v, g, beta, h0):
            if x is not None:
                x.requires_grad_()
    return q, k, v, g, beta, h0


# The chunk reference runs in blocks of 3 chunks here, so every shape with more than 3 hands the state on.
SHAPES = [(1, 16, 16, 16), (63, 24, 20, 16), (37, 7, 40, 64), (64, 32, 33, 32), (75, 8, 12, 4)]


@pytest.mark.parametrize("T,K,V,L", SHAPES, ids=[f"T{t}-K{k}-V{v}-L{c}" for t, k, v, c in SHAPES])
def test_chunk_reference_matches_recurrence(T, K, V, L, monkeypatch):
    monkeypatch.setattr(reference, "BLOCK_ELEMENTS", 3 * 2 * 2 * L * L)  # blocks of 3 chunks at B = H = 2
    q, k, v, g, beta, h0 = make_inputs(2, T, 2, K, V)
    o_rec, s_rec = reference.delta_rule_recurrent(q, k, v, g, beta, initial_state=h0)
    o_chunk, s_chunk = reference.delta_rule_chunk(q, k, v, g, beta, initial_state=h0, chunk_size=L)
    assert rel_rmse(o_chunk, o_rec) < 1e-5
    assert rel_rmse(s_chunk, s_rec) < 1e-5


def test_step_continues_a_chunk():
    q, k, v, g, beta, h0 = make_inputs(2, 20, 2, 12, 10)
    o_all, s_all = reference.delta_rule_recurrent(q, k, v, g, beta, initial_state=h0)
    o_pre, state = reference.delta_rule_chunk(q[:, :15], k[:, :15], v[:, :15], g[:, :15], beta[:, :15],
                                              initial_state=h0, chunk_size=8)
    outs = [o_pre]
    for t in range(15, 20):
        o_t, state = delta_rule_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
        outs.append(o_t[:, None])
    assert rel_rmse(torch.cat(outs, 1), o_all) < 1e-5 and rel_rmse(state, s_all) < 1e-5


def test_reference_matches_fla_naive():
    """Our recurrence and WY chunk form against flash-linear-attention's naive recurrent and chunk ops."""
    naive = pytest.importorskip("fla.ops.gated_delta_rule.naive", reason="flash-linear-attention not installed")
    q, k, v, g, beta, h0 = make_inputs(2, 45, 3, 20, 24)
    o_fla, s_fla = naive.naive_recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=h0,
                                                          output_final_state=True)
    o_fla_chunk, s_fla_chunk = naive.naive_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=16,
                                                                  initial_state=h0, output_final_state=True)
    assert rel_rmse(o_fla_chunk, o_fla) < 1e-5
    for o, s in (reference.delta_rule_recurrent(q, k, v, g, beta, initial_state=h0),
                 reference.delta_rule_chunk(q, k, v, g, beta, initial_state=h0, chunk_size=16)):
        assert rel_rmse(o, o_fla) < 1e-5
        assert rel_rmse(s, s_fla) < 1e-5


# ---------------------------------------------------------------------------------------------------
# Triton kernel (interpreter on the CPU)
# ---------------------------------------------------------------------------------------------------


KERNEL_SHAPES = [(63, 24, 40, True), (16, 16, 16, False)]
# fp32: measured up to 4e-7 (outputs, states, gradients); fp16 inputs against fp32 on the same rounded
# values: measured up to 3e-4 (the fp16 output and gradient rounding).
TOLERANCE = {torch.float32: 5e-6, torch.float16: 3e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T,K,V,with_state", KERNEL_SHAPES,
                         ids=[f"T{t}-K{k}-V{v}-{'h0' if s else 'nostate'}" for t, k, v, s in KERNEL_SHAPES])
def test_triton_matches_reference_forward_and_backward(T, K, V, with_state, dtype, nan_buffers):
    from mixer_kernels.delta_rule.triton import chunk_gated_delta_rule_triton

    q, k, v, g, beta, h0 = make_inputs(1, T, 2, K, V, with_state=with_state)
    q, k, v = (x.to(dtype).float() for x in (q, k, v))  # the values the half kernel sees, in fp32
    ref_in = [x.clone().requires_grad_() if x is not None else None for x in (q, k, v, g, beta, h0)]
    o_ref, s_ref = reference.delta_rule_recurrent(*ref_in[:5], initial_state=ref_in[5])
    tri_in = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)] + [
        x.detach().clone().requires_grad_() if x is not None else None for x in (g, beta, h0)]
    o_tri, s_tri = chunk_gated_delta_rule_triton(*tri_in[:5], initial_state=tri_in[5], chunk_size=16)
    tol = TOLERANCE[dtype]
    assert o_tri.dtype == dtype and rel_rmse(o_tri, o_ref) < tol and rel_rmse(s_tri, s_ref) < tol
    gen = torch.Generator().manual_seed(1)
    do, ds = torch.randn(o_ref.shape, generator=gen), torch.randn(s_ref.shape, generator=gen)
    grads_ref = torch.autograd.grad((o_ref * do).sum() + (s_ref * ds).sum(), [x for x in ref_in if x is not None])
    grads_tri = torch.autograd.grad((o_tri.float() * do).sum() + (s_tri * ds).sum(),
                                    [x for x in tri_in if x is not None])
    for name, a, b in zip("q k v g beta h0".split(), grads_tri, grads_ref):
        assert rel_rmse(a, b) < tol, name


def test_triton_rejects_bad_inputs():
    from mixer_kernels.delta_rule.triton import chunk_gated_delta_rule_triton

    q, k, v, g, beta, _ = make_inputs(1, 8, 1, 16, 16)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_gated_delta_rule_triton(q, k, v, g, beta, chunk_size=8)
    with pytest.raises(ValueError, match="beta"):
        chunk_gated_delta_rule_triton(q, k, v, g, beta[..., None])


def test_aot_specs_cover_every_kernel_and_dtype():
    from mixer_kernels.delta_rule import triton as gdr_triton

    names = {(s["name"], s["dtype"]) for s in gdr_triton.AOT_KERNELS}
    kernels = {"_gdr_wy_kernel", "_gdr_fwd_kernel", "_gdr_bwd_dstates_kernel", "_gdr_bwd_values_kernel",
               "_gdr_bwd_keys_kernel"}
    assert names == {(n, d) for n in kernels for d in ("fp32", "bf16", "fp16")}
    for spec in gdr_triton.AOT_KERNELS:
        assert set(spec["signature"]) == set(spec["fn"].arg_names)
