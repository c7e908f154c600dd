"""Tests of mixer_kernels/mlstm: the chain reference -> recurrent -> chunkwise -> Triton, and the dispatcher.

External references this project did not write: transformers' native xLSTM mLSTM functions (always)
and NX-AI's mlstm_kernels native torch ops (when installed).
The Triton kernel runs under TRITON_INTERPRET=1 on the CPU; it must be set before triton is imported
(tests/conftest.py should do it for the whole suite).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402
import torch  # noqa: E402

from mixer_kernels.mlstm import mlstm_chunkwise, mlstm_parallel, mlstm_recurrent_step, reference  # noqa: E402

xlstm_hf = pytest.importorskip("transformers.models.xlstm.modeling_xlstm", reason="transformers xLSTM needed")

ON_CPU_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def rel_rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, the closeness measure of flash-linear-attention's kernel tests."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(B, NH, T, DQK, DV, *, seed=0, with_state=False, device="cpu", dtype=torch.float32):
    """Gates spread like a trained xLSTM's (input gate around 0, forget gate mostly open)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, NH, T, DQK, generator=g)
    k = torch.randn(B, NH, T, DQK, generator=g)
    v = torch.randn(B, NH, T, DV, generator=g)
    i = 2.0 * torch.randn(B, NH, T, generator=g)
    f = 2.0 + 2.0 * torch.randn(B, NH, T, generator=g)
    xs = [x.to(device=device, dtype=dtype) for x in (q, k, v, i, f)]
    state = None
    if with_state:  # a state as a previous chunk would leave it
        _, state = reference.mlstm_chunkwise(*make_inputs(B, NH, 20, DQK, DV, seed=seed + 1)[0], chunk_size=8)
        state = tuple(s.to(device) for s in state)
    return xs, state


def step_loop(q, k, v, i, f, state=None):
    hs = []
    for t in range(q.shape[2]):
        h_t, state = mlstm_recurrent_step(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t], state)
        hs.append(h_t)
    return torch.stack(hs, dim=2), state


# ---------------------------------------------------------------------------------------------------
# PyTorch reference: parallel == chunkwise == recurrent, and == the external references
# ---------------------------------------------------------------------------------------------------

FORM_CASES = [(1, 16), (63, 16), (64, 16), (37, 64), (50, 7)]


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("HP_KERNELS", "reference")


@pytest.mark.parametrize("T,chunk", FORM_CASES, ids=[f"T{t}-L{c}" for t, c in FORM_CASES])
def test_parallel_chunkwise_recurrent_agree(T, chunk):
    (q, k, v, i, f), _ = make_inputs(2, 3, T, 24, 40)
    h_par = mlstm_parallel(q, k, v, i, f)
    h_chunk, state_chunk = mlstm_chunkwise(q, k, v, i, f, chunk_size=chunk)
    h_rec, state_rec = step_loop(q, k, v, i, f)
    assert rel_rmse(h_chunk, h_rec) < 1e-5
    assert rel_rmse(h_par, h_rec) < 1e-5
    for a, b in zip(state_chunk, state_rec):
        assert a.dtype == torch.float32 and rel_rmse(a, b) < 1e-5


@pytest.mark.parametrize("T,chunk", [(63, 16), (1, 16)], ids=["T63-L16", "T1-L16"])
def test_chunkwise_recurrent_agree_with_initial_state(T, chunk):
    (q, k, v, i, f), state = make_inputs(2, 3, T, 24, 40, with_state=True)
    h_chunk, state_chunk = mlstm_chunkwise(q, k, v, i, f, initial_state=state, chunk_size=chunk)
    h_rec, state_rec = step_loop(q, k, v, i, f, state)
    assert rel_rmse(h_chunk, h_rec) < 1e-5
    for a, b in zip(state_chunk, state_rec):
        assert rel_rmse(a, b) < 1e-5


def test_reference_gradients_agree():
    """Autograd through chunkwise and through the step loop give the same gradients."""
    (q, k, v, i, f), state = make_inputs(1, 2, 21, 24, 40, with_state=True)
    leaves = [x.requires_grad_() for x in (q, k, v, i, f, *state)]
    dh = torch.randn(1, 2, 21, 40)
    h_chunk, _ = mlstm_chunkwise(q, k, v, i, f, initial_state=tuple(leaves[5:]), chunk_size=8)
    g_chunk = torch.autograd.grad((h_chunk * dh).sum(), leaves)
    h_rec, _ = step_loop(q, k, v, i, f, tuple(leaves[5:]))
    g_rec = torch.autograd.grad((h_rec * dh).sum(), leaves)
    for name, a, b in zip(["q", "k", "v", "i", "f", "C0", "n0", "m0"], g_chunk, g_rec):
        assert rel_rmse(a, b) < 1e-5, name


def test_prefill_then_step_equals_full_forward():
    (q, k, v, i, f), _ = make_inputs(2, 3, 40, 24, 40)
    h_full, state_full = mlstm_chunkwise(q, k, v, i, f, chunk_size=16)
    h_pre, state = mlstm_chunkwise(q[:, :, :33], k[:, :, :33], v[:, :, :33], i[:, :, :33], f[:, :, :33],
                                   chunk_size=16)
    h_steps, state = step_loop(q[:, :, 33:], k[:, :, 33:], v[:, :, 33:], i[:, :, 33:], f[:, :, 33:], state)
    assert rel_rmse(torch.cat([h_pre, h_steps], dim=2), h_full) < 1e-5
    for a, b in zip(state, state_full):
        assert rel_rmse(a, b) < 1e-5


def test_chunkwise_resumes_from_its_final_state():
    (q, k, v, i, f), _ = make_inputs(2, 3, 50, 24, 40)
    h_full, state_full = mlstm_chunkwise(q, k, v, i, f, chunk_size=16)
    h1, s1 = mlstm_chunkwise(q[:, :, :19], k[:, :, :19], v[:, :, :19], i[:, :, :19], f[:, :, :19], chunk_size=16)
    h2, s2 = mlstm_chunkwise(q[:, :, 19:], k[:, :, 19:], v[:, :, 19:], i[:, :, 19:], f[:, :, 19:],
                             initial_state=s1, chunk_size=16)
    assert rel_rmse(torch.cat([h1, h2], dim=2), h_full) < 1e-5
    for a, b in zip(s2, state_full):
        assert rel_rmse(a, b) < 1e-5


@pytest.mark.parametrize("T", [1, 37, 64])
def test_matches_transformers_native(T):
    """transformers' xLSTM natives: recurrent sequence (any T, initial state), step, chunkwise."""
    (q, k, v, i, f), (c0, n0, m0) = make_inputs(2, 3, T, 24, 40, with_state=True)
    h_hf, (c_hf, n_hf, m_hf) = xlstm_hf.mlstm_recurrent_sequence_native(
        q, k, v, i, f, c_initial=c0, n_initial=n0, m_initial=m0, return_last_states=True
    )
    h, (c, n, m) = mlstm_chunkwise(q, k, v, i, f, initial_state=(c0, n0, m0), chunk_size=16)
    assert rel_rmse(h, h_hf) < 1e-5
    for a, b in zip((c, n, m), (c_hf, n_hf, m_hf)):
        assert rel_rmse(a, b) < 1e-5

    h_t_hf, state_hf = xlstm_hf.mlstm_recurrent_step_native(
        q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, :1], f[:, :, :1], c0, n0, m0
    )
    h_t, state = mlstm_recurrent_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0], (c0, n0, m0))
    assert rel_rmse(h_t, h_t_hf) < 1e-5
    for a, b in zip(state, state_hf):
        assert rel_rmse(a, b) < 1e-5

    if T % 16 == 0:
        h_hf, (c_hf, n_hf, m_hf) = xlstm_hf.mlstm_chunkwise_native_autograd(
            q, k, v, i, f, c_initial=c0, n_initial=n0, m_initial=m0, return_last_states=True, chunk_size=16
        )
        assert rel_rmse(h, h_hf) < 1e-5
        for a, b in zip((c, n, m), (c_hf, n_hf, m_hf)):
            assert rel_rmse(a, b) < 1e-5


def test_matches_mlstm_kernels_native():
    """NX-AI's mlstm_kernels native torch ops: parallel, chunkwise (with state) and recurrent step."""
    mk_parallel = pytest.importorskip("mlstm_kernels.torch.parallel", reason="mlstm-kernels==2.0.6 not installed")
    mk_chunkwise = pytest.importorskip("mlstm_kernels.torch.chunkwise", reason="mlstm-kernels not installed")
    mk_recurrent = pytest.importorskip("mlstm_kernels.torch.recurrent", reason="mlstm-kernels not installed")
    (q, k, v, i, f), (c0, n0, m0) = make_inputs(2, 3, 48, 24, 40, with_state=True)

    h_mk = mk_parallel.mlstm_parallel__native_autograd(q, k, v, i, f)
    assert rel_rmse(mlstm_parallel(q, k, v, i, f), h_mk) < 1e-5

    h_mk, state_mk = mk_chunkwise.mlstm_chunkwise__native_autograd(
        q, k, v, i, f, c_initial=c0, n_initial=n0, m_initial=m0, return_last_states=True, chunk_size=16
    )
    h, state = mlstm_chunkwise(q, k, v, i, f, initial_state=(c0, n0, m0), chunk_size=16)
    assert rel_rmse(h, h_mk) < 1e-5
    for a, b in zip(state, state_mk):
        assert rel_rmse(a, b) < 1e-5

    h_t_mk, state_mk = mk_recurrent.mlstm_recurrent_step__native(
        q[:, :, 5], k[:, :, 5], v[:, :, 5], i[:, :, 5:6], f[:, :, 5:6], c0, n0, m0
    )
    h_t, state = mlstm_recurrent_step(q[:, :, 5], k[:, :, 5], v[:, :, 5], i[:, :, 5], f[:, :, 5], (c0, n0, m0))
    assert rel_rmse(h_t, h_t_mk) < 1e-5
    for a, b in zip(state, state_mk):
        assert rel_rmse(a, b) < 1e-5


def test_bad_inputs_raise_value_error():
    (q, k, v, i, f), _ = make_inputs(1, 2, 8, 16, 16)
    with pytest.raises(ValueError, match="k must have the shape of q"):
        mlstm_chunkwise(q, k[..., :8], v, i, f)
    with pytest.raises(ValueError, match="f_preact"):
        mlstm_chunkwise(q, k, v, i, f[..., :4])
    with pytest.raises(ValueError, match="state m"):
        mlstm_chunkwise(q, k, v, i, f, initial_state=(torch.zeros(1, 2, 16, 16), torch.zeros(1, 2, 16),
                                                      torch.zeros(1, 2)))
    with pytest.raises(ValueError, match="i_t, f_t"):
        mlstm_recurrent_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, :1], f[:, :, 0], None)


# ---------------------------------------------------------------------------------------------------
# Triton kernel (interpreter on the CPU) against true autograd of the reference
# ---------------------------------------------------------------------------------------------------

triton = pytest.importorskip("triton", reason="triton not installed")
DEVICE = "cuda" if torch.cuda.is_available() and not ON_CPU_INTERPRETER else "cpu"
needs_triton_device = pytest.mark.skipif(
    DEVICE == "cpu" and not ON_CPU_INTERPRETER, reason="Triton needs CUDA or TRITON_INTERPRET=1"
)


TRITON_CASES = [  # (B, NH, T, DQK, DV, chunk, initial state); odd T and head sizes that are no power of two
    (2, 3, 63, 24, 40, 16, False),
    (2, 3, 63, 24, 40, 16, True),
    (2, 3, 1, 24, 40, 16, True),  # (from a zero state at T = 1, d f is exactly 0: no relative error to take)
    (1, 2, 45, 40, 24, 32, False),
    (1, 2, 45, 40, 24, 32, True),
]
# fp32, against the reference with the same backward (stabiliser as a constant): measured up to 1e-6 on
# outputs and states and 5e-6 on gradients. fp16 inputs against fp32 on the same rounded inputs: see below.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2}


@needs_triton_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B,NH,T,DQK,DV,chunk,with_state", TRITON_CASES, ids=[
    "B{}-NH{}-T{}-DQK{}-DV{}-L{}-{}".format(*c[:6], "h0" if c[6] else "zero") for c in TRITON_CASES])
def test_triton_forward_backward_match_reference(nan_buffers, monkeypatch, dtype, B, NH, T, DQK, DV, chunk,
                                                 with_state):
    """fp16 (the interpreter cannot do bf16): q, k, v rounded to fp16, the reference fed the same values in
    fp32. Measured: outputs up to 5e-4, gradients up to 1.5e-3 (the kernel rounds its dot operands to fp16)."""
    (q, k, v, i, f), state = make_inputs(B, NH, T, DQK, DV, seed=T, with_state=with_state, device=DEVICE)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    state = state or reference.zero_state(B, NH, DQK, DV, DEVICE)
    leaves = [x.clone().float().requires_grad_() for x in (q, k, v, i, f, *state)]
    dh = torch.randn(B, NH, T, DV, device=DEVICE)

    h_ref, s_ref = reference.mlstm_chunkwise(*leaves[:5], initial_state=tuple(leaves[5:]), chunk_size=chunk,
                                             stabilizer_grad=False)
    g_ref = torch.autograd.grad((h_ref * dh).sum(), leaves)

    monkeypatch.setenv("HP_KERNELS", "mlstm=fast")
    inputs = [x.detach().to(dtype).requires_grad_() for x in leaves[:3]] + [x.detach().requires_grad_()
                                                                           for x in leaves[3:]]
    h, s = mlstm_chunkwise(*inputs[:5], initial_state=tuple(inputs[5:]), chunk_size=chunk)
    assert h.shape == h_ref.shape and h.dtype == dtype
    tol = TOLERANCE[dtype]
    assert rel_rmse(h, h_ref) < tol
    for name, a, b in zip("Cnm", s, s_ref):
        assert a.dtype == torch.float32 and rel_rmse(a, b) < tol, name
    g = torch.autograd.grad((h.float() * dh).sum(), inputs)
    for name, a, b in zip(["dq", "dk", "dv", "di", "df", "dC0", "dn0", "dm0"], g, g_ref):
        assert torch.isfinite(a).all() and rel_rmse(a, b) < tol, name


def test_the_kernels_backward_differs_from_exact_autograd_only_where_the_stabiliser_floor_acts():
    """What `stabilizer_grad=False` (the Triton kernel's and mlstm_kernels' backward) leaves out: the
    dependence on m through the normaliser's floor exp(-m) and through eps. With a large q.n the floor is
    never active and the two agree."""
    (q, k, v, i, f), state = make_inputs(1, 2, 40, 16, 16, seed=5, with_state=True)
    grads = []
    for exact in (True, False):
        leaves = [x.clone().requires_grad_() for x in (q * 10, k, v, i, f, *state)]
        h, _ = reference.mlstm_chunkwise(*leaves[:5], initial_state=tuple(leaves[5:]), chunk_size=16,
                                         stabilizer_grad=exact)
        grads.append(torch.autograd.grad(h.sum(), leaves))
    for name, a, b in zip(["dq", "dk", "dv", "di", "df", "dC0", "dn0"], *grads):
        assert rel_rmse(a, b) < 1e-4, name


@needs_triton_device
def test_triton_gradients_flow_through_final_state(nan_buffers, monkeypatch):
    """Two chained calls (state of the first fed to the second) match the chained reference."""
    (q, k, v, i, f), state = make_inputs(2, 3, 50, 24, 40, seed=3, with_state=True, device=DEVICE)
    dh = torch.randn(2, 3, 50, 40, device=DEVICE)

    def chained(fn, **kw):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, i, f, *state)]
        cut = 29
        first = [x[:, :, :cut] for x in leaves[:5]]
        second = [x[:, :, cut:] for x in leaves[:5]]
        h1, s1 = fn(*first, initial_state=tuple(leaves[5:]), chunk_size=16, **kw)
        h2, _ = fn(*second, initial_state=s1, chunk_size=16, **kw)
        h = torch.cat([h1, h2], dim=2)
        return h, torch.autograd.grad((h * dh).sum(), leaves)

    h_ref, g_ref = chained(reference.mlstm_chunkwise, stabilizer_grad=False)
    monkeypatch.setenv("HP_KERNELS", "mlstm=fast")
    h, g = chained(mlstm_chunkwise)
    assert rel_rmse(h, h_ref) < 1e-5
    for name, a, b in zip(["dq", "dk", "dv", "di", "df", "dC0", "dn0", "dm0"], g, g_ref):
        assert rel_rmse(a, b) < 1e-5, name


@pytest.mark.skipif(not torch.cuda.is_available() or ON_CPU_INTERPRETER, reason="needs a CUDA GPU")
@pytest.mark.parametrize("chunk", [32, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_half_precision_on_gpu(monkeypatch, dtype, chunk):
    """bf16 / fp16 kernels against the fp32 reference fed the same rounded q, k, v (the interpreter
    cannot check these dtypes). Measured on an H100: bf16 about 3e-3, fp16 about 5e-4 per tensor."""
    (q, k, v, i, f), state = make_inputs(2, 4, 300, 64, 96, with_state=True, device="cuda")
    rounded = [x.to(dtype) for x in (q, k, v)]
    leaves = [x.float().requires_grad_() for x in rounded] + [i.requires_grad_(), f.requires_grad_()]
    dh = torch.randn(2, 4, 300, 96, device="cuda")
    h_ref, _ = reference.mlstm_chunkwise(*leaves, initial_state=state, chunk_size=chunk)
    g_ref = torch.autograd.grad((h_ref * dh).sum(), leaves)
    half = [x.clone().requires_grad_() for x in rounded] + leaves[3:]
    monkeypatch.setenv("HP_KERNELS", "mlstm=fast")
    h, _ = mlstm_chunkwise(*half, initial_state=state, chunk_size=chunk)
    assert h.dtype == dtype and rel_rmse(h, h_ref) < 1e-2
    g = torch.autograd.grad((h.float() * dh).sum(), half)
    for name, a, b in zip(["dq", "dk", "dv", "di", "df"], g, g_ref):
        assert rel_rmse(a, b) < 1e-2, name


# ---------------------------------------------------------------------------------------------------
# Dispatcher and AOT specs
# ---------------------------------------------------------------------------------------------------


def test_aot_kernel_specs_cover_every_kernel_argument():
    from mixer_kernels.mlstm.triton import AOT_KERNELS

    assert {s["dtype"] for s in AOT_KERNELS} == {"fp32", "bf16", "fp16"}
    assert len({s["name"] for s in AOT_KERNELS}) == 5
    for spec in AOT_KERNELS:
        assert list(spec["signature"]) == list(spec["fn"].arg_names), spec["name"]
        for name, value in spec["constexprs"].items():
            assert spec["signature"][name] == "constexpr" and value is not None
