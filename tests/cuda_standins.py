"""Stand-ins for the compiled CUDA extensions of the `cuda` extra, so the packages' own Python code runs in CI.

scripts/setup.sh installs mamba-ssm 2.3.2.post1, causal-conv1d 1.7.0 and flash-attn 2.8.3 without their
CUDA builds. Each package's Python layer imports one compiled module; `install(monkeypatch)` puts a
stand-in for each into sys.modules, implementing that module's contract (the calls, in-place outputs and
return values the package's autograd Functions expect) with the package's own reference where it has one:

- `selective_scan_cuda.fwd/bwd` (mamba-ssm): its `selective_scan_ref`; the backward is autograd through it;
- `causal_conv1d_cuda.causal_conv1d_fwd/bwd/update` (causal-conv1d): its `causal_conv1d_ref` and
  `causal_conv1d_update_ref`, after the layout checks of its C++ code (csrc/causal_conv1d.cpp);
- `flash_attn_2_cuda.fwd/bwd/varlen_fwd/varlen_bwd` (flash-attn): the softmax attention it computes (fp32
  softmax, causal mask aligned bottom-right, windows, grouped KV heads, per-sequence varlen), with its
  dtype and head-size checks; flash-attn registers its ops for CUDA only, so they get CPU kernels too.

mamba-ssm's Triton kernels (SSD, selective_state_update) need no stand-in: they run under TRITON_INTERPRET=1
(autotuning trimmed to one config, which the interpreter needs; torch.cuda.device made a no-op and
torch.cuda.get_device_properties an H100's multiprocessor count).

Use the `cuda_packages` fixture (tests/conftest.py): afterwards the packages' modules leave sys.modules
again, so later tests (transformers' Mamba, which calls mamba-ssm's kernels whenever they import) see the
packages unimportable, as on a machine without CUDA.
"""

import concurrent.futures
import contextlib
import sys
import types

import torch
import torch.nn.functional as F

VERSIONS = {"mamba_ssm": "2.3.2.post1", "causal_conv1d": "1.7.0", "flash_attn": "2.8.3"}


# ---- mamba-ssm: selective_scan_cuda ------------------------------------------------------------------------

def _scan_ref():
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

    return selective_scan_ref


def _scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    out, last = _scan_ref()(u, delta, A, B, C, D, None, delta_bias, delta_softplus, return_last_state=True)
    x = torch.zeros(*last.shape[:2], 1, 2 * last.shape[2], dtype=torch.float32)  # the kernel's chunk states
    x[..., -1, 1::2] = last
    return (out, x) if z is None else (out, x, (out.float() * F.silu(z.float())).to(out.dtype))


def _scan_bwd(u, delta, A, B, C, D, z, delta_bias, dout, x, out, dz, delta_softplus, recompute_out_z):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (u, delta, A, B, C, D, z, delta_bias)]
    with torch.enable_grad():
        y = _scan_ref()(*leaves[:7], leaves[7], delta_softplus)
        inputs = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(y, inputs, dout))
    du, ddelta, dA, dB, dC, dD, dz_, ddelta_bias = (next(grads) if t is not None else None for t in leaves)
    return (du, ddelta, dA, dB, dC, dD, ddelta_bias) + ((dz_,) if z is not None else ())


# ---- causal-conv1d: causal_conv1d_cuda ---------------------------------------------------------------------

def _check_conv_layout(x, weight, initial_states, seq_idx=None):
    """What csrc/causal_conv1d.cpp checks before launching."""
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16)
    assert x.stride(2) == 1 or x.stride(1) == 1
    channel_last = x.stride(1) == 1 and x.stride(2) > 1
    if channel_last:
        assert x.shape[1] % 8 == 0, "causal_conv1d only supports channel dimension divisible by 8 for now"
        assert x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0, \
            "causal_conv1d with channel last layout requires strides (x.stride(0) and x.stride(2)) to be multiples of 8"
    assert 2 <= weight.shape[1] <= 4, "causal_conv1d only supports width between 2 and 4"
    if initial_states is not None:
        assert channel_last, "initial_states is only supported for channel last layout"
        assert initial_states.dtype == x.dtype and initial_states.stride(1) == 1
    if seq_idx is not None:
        assert channel_last, "seq_idx is only supported for channel last layout"
        assert seq_idx.dtype == torch.int32 and seq_idx.is_contiguous()
        assert seq_idx.shape == (x.shape[0], x.shape[2])
    return channel_last


def _conv_ref():
    from causal_conv1d.causal_conv1d_interface import causal_conv1d_ref

    return causal_conv1d_ref


def _conv_fwd(x, weight, bias, seq_idx, initial_states, out, final_states_out, silu):
    channel_last = _check_conv_layout(x, weight, initial_states, seq_idx)
    assert final_states_out is None or channel_last, "final_states is only supported for channel last layout"
    assert seq_idx is None or final_states_out is None  # (the package's Python wrapper refuses the pair)
    if seq_idx is not None:  # the package's reference keeps the documents apart the way its kernel does
        out.copy_(_conv_ref()(x, weight, bias, initial_states, False, None, "silu" if silu else None, seq_idx))
        return
    y, state = _conv_ref()(x, weight, bias, initial_states, True, None, "silu" if silu else None)
    out.copy_(y)
    if final_states_out is not None:
        final_states_out.copy_(state)


def _with_autograd(fn):
    """Run fn where autograd records: a torch.library custom op (flash-attn's, causal-conv1d's) calls its kernel
    below the autograd dispatch keys, which a fresh thread does not inherit."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


def _conv_bwd(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx, dweight, dbias, dinitial_states,
              silu):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, weight, bias, initial_states)]

    def backward():
        if seq_idx is not None:
            y, state = _conv_ref()(*leaves, False, None, "silu" if silu else None, seq_idx), None
        else:
            y, state = _conv_ref()(*leaves, True, None, "silu" if silu else None)
        loss = (y * dout).sum() + (0 if dfinal_states is None else (state * dfinal_states).sum())
        return torch.autograd.grad(loss, [t for t in leaves if t is not None], allow_unused=True)

    grads = iter(_with_autograd(backward))
    for target, leaf in zip((dx, dweight, dbias, dinitial_states), leaves):
        grad = next(grads) if leaf is not None else None
        if target is not None and grad is not None:
            target.copy_(grad)


def _conv_update(x, conv_state, weight, bias, out, silu, cache_seqlens, conv_state_indices):
    from causal_conv1d.causal_conv1d_interface import causal_conv1d_update_ref

    assert cache_seqlens is None and conv_state_indices is None
    assert conv_state.dtype == x.dtype and 2 <= weight.shape[1] <= 4
    out.copy_(causal_conv1d_update_ref(x, conv_state, weight, bias, "silu" if silu else None))  # state in place


# ---- flash-attn: flash_attn_2_cuda -------------------------------------------------------------------------

def _attend(q, k, v, scale, causal, window_left, window_right):
    """q (Tq, H, D), k, v (Tk, Hkv, D) of one sequence -> out (Tq, H, D) in q's dtype, lse (H, Tq) fp32."""
    assert q.dtype in (torch.float16, torch.bfloat16), "FlashAttention only support fp16 and bf16 data type"
    assert q.shape[-1] <= 256 and q.shape[-1] % 8 == 0, "head size <= 256, padded to a multiple of 8"
    tq, tk = q.shape[0], k.shape[0]
    k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    i = torch.arange(tq)[:, None] + tk - tq  # bottom-right alignment: query i sits at key position i + tk - tq
    j = torch.arange(tk)[None, :]
    allowed = torch.ones(tq, tk, dtype=torch.bool)
    if causal:
        allowed &= j <= i
    if window_left >= 0:
        allowed &= j >= i - window_left
    if window_right >= 0:
        allowed &= j <= i + window_right
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (H, Tq)
    out = torch.einsum("hqk,khd->qhd", torch.exp(scores - lse[..., None]), v.float())
    return out.to(q.dtype), lse


def _attend_backward(dout, q, k, v, scale, causal, window_left, window_right):
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]

    def backward():
        out, _ = _attend(*(t.to(q.dtype) for t in leaves), scale, causal, window_left, window_right)
        return torch.autograd.grad(out.float(), leaves, dout.float())

    return _with_autograd(backward)


def _fa_fwd(q, k, v, out, alibi, dropout_p, scale, causal, window_left, window_right, softcap, return_softmax, gen):
    assert alibi is None and dropout_p == 0 and softcap == 0
    outs, lses = zip(*(_attend(q[b], k[b], v[b], scale, causal, window_left, window_right) for b in range(q.shape[0])))
    return torch.stack(outs), torch.stack(lses), torch.empty(0, dtype=q.dtype), torch.zeros(2, dtype=torch.int64)


def _fa_bwd(dout, q, k, v, out, lse, dq, dk, dv, alibi, dropout_p, scale, causal, window_left, window_right, softcap,
            deterministic, gen, rng_state):
    grads = [_attend_backward(dout[b], q[b], k[b], v[b], scale, causal, window_left, window_right)
             for b in range(q.shape[0])]
    dq, dk, dv = (torch.empty_like(t) if d is None else d for t, d in ((q, dq), (k, dk), (v, dv)))
    for b, (gq, gk, gv) in enumerate(grads):
        dq[b], dk[b], dv[b] = gq, gk, gv
    return dq, dk, dv, torch.zeros(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)


def _segments(cu_q, cu_k):
    return [(slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))) for i in range(len(cu_q) - 1)]


def _fa_varlen_fwd(q, k, v, out, cu_q, cu_k, seqused_k, leftpad_k, block_table, alibi, max_q, max_k, dropout_p,
                   scale, zero_tensors, causal, window_left, window_right, softcap, return_softmax, gen):
    assert seqused_k is None and leftpad_k is None and block_table is None and alibi is None and dropout_p == 0
    assert cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32, "cu_seqlens must have dtype int32"
    out, lse = torch.empty_like(q), torch.empty(q.shape[1], q.shape[0], dtype=torch.float32)
    for sq, sk in _segments(cu_q, cu_k):
        assert sq.stop - sq.start <= max_q and sk.stop - sk.start <= max_k
        out[sq], lse[:, sq] = _attend(q[sq], k[sk], v[sk], scale, causal, window_left, window_right)
    return out, lse, torch.empty(0, dtype=q.dtype), torch.zeros(2, dtype=torch.int64)


def _fa_varlen_bwd(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, alibi, max_q, max_k, dropout_p, scale,
                   zero_tensors, causal, window_left, window_right, softcap, deterministic, gen, rng_state):
    dq, dk, dv = (torch.empty_like(t) if d is None else d for t, d in ((q, dq), (k, dk), (v, dv)))
    for sq, sk in _segments(cu_q, cu_k):
        dq[sq], dk[sk], dv[sk] = _attend_backward(dout[sq], q[sq], k[sk], v[sk], scale, causal, window_left,
                                                  window_right)
    return dq, dk, dv, torch.zeros(q.shape[1], q.shape[0], dtype=torch.float32)


# ---- installing them -----------------------------------------------------------------------------------------

PACKAGES = ("mamba_ssm", "causal_conv1d", "flash_attn")

def _module(name: str, **functions) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(functions, __doc__=f"tests/cuda_standins.py: a CPU stand-in for {name}")
    return module


def install(monkeypatch) -> None:
    """Put the stand-ins into sys.modules, then import the three packages on the CPU."""
    import importlib.util

    for package, version in VERSIONS.items():  # installed by scripts/setup.sh: their absence is a failure
        assert importlib.util.find_spec(package), f"{package}=={version} is not installed: run scripts/setup.sh"
    monkeypatch.setitem(sys.modules, "selective_scan_cuda", _module(
        "selective_scan_cuda", fwd=_scan_fwd, bwd=_scan_bwd))
    monkeypatch.setitem(sys.modules, "causal_conv1d_cuda", _module(
        "causal_conv1d_cuda", causal_conv1d_fwd=_conv_fwd, causal_conv1d_bwd=_conv_bwd,
        causal_conv1d_update=_conv_update))
    monkeypatch.setitem(sys.modules, "flash_attn_2_cuda", _module(
        "flash_attn_2_cuda", fwd=_fa_fwd, bwd=_fa_bwd, varlen_fwd=_fa_varlen_fwd, varlen_bwd=_fa_varlen_bwd))
    monkeypatch.setattr(torch.cuda, "device", lambda *a, **k: contextlib.nullcontext())
    # mamba-ssm's SSD backward sizes its grids by the GPU's multiprocessor count (an H100's here).
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda *a, **k: types.SimpleNamespace(multi_processor_count=132, name="CPU stand-in"))
    import causal_conv1d  # noqa: F401
    import flash_attn.flash_attn_interface as fa
    import mamba_ssm.ops.selective_scan_interface  # noqa: F401
    import mamba_ssm.ops.triton.selective_state_update  # noqa: F401
    import mamba_ssm.ops.triton.ssd_combined  # noqa: F401

    for op in (fa._flash_attn_forward, fa._flash_attn_backward, fa._flash_attn_varlen_forward,
               fa._flash_attn_varlen_backward):  # flash-attn's custom ops come with CUDA kernels only
        if "cpu" not in op._backend_fns:
            op.register_kernel("cpu")(op._init_fn)
    # The Triton interpreter cannot benchmark autotune candidates: keep the first config of each kernel.
    from triton.runtime.autotuner import Autotuner

    for name, mod in list(sys.modules.items()):
        if name.startswith("mamba_ssm.ops.triton."):
            for kernel in vars(mod).values():
                if isinstance(kernel, Autotuner) and len(kernel.configs) > 1:
                    monkeypatch.setattr(kernel, "configs", kernel.configs[:1])


def uninstall() -> None:
    """Forget the packages' modules (the stand-ins themselves leave with the monkeypatch)."""
    from mixer_kernels import backend

    for name in [n for n in sys.modules if n.split(".")[0] in PACKAGES]:
        del sys.modules[name]
    backend.load_function.cache_clear()
