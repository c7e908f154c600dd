"""Launch code our Triton ops share (mixer_kernels/mlstm, mixer_kernels/gla, mixer_kernels/delta_rule): output buffers, the dot
precision, the device guard, the time padding of the (B, T, H, D) layout, and the ahead-of-time specs.

Kernels index with int64: each one widens its program ids first (`tl.program_id(i).to(tl.int64)`), so every
offset built from them is 64-bit; state buffers pass 2^31 elements at xLSTM-7B's T=8192 with batch 16
(tests/kernels/test_aot.py reads the compiled IR for it).
"""

import contextlib

import torch
import torch.nn.functional as F


def alloc(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launchers write; tests replace it with a NaN-filled allocator."""
    return torch.empty(*shape, dtype=dtype, device=device)


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: exact for fp32 inputs, tf32 otherwise (half inputs are exact in tf32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def on_device(tensor: torch.Tensor):
    """Launch under the tensors' own device: Triton launches on the current CUDA device, which need not
    be theirs (e.g. `launch/evaluate.py --device cuda:1`)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def check_chunk(chunk_size: int, allowed: tuple[int, ...]) -> None:
    if chunk_size not in allowed:
        raise ValueError(f"chunk_size must be one of {allowed} for the Triton kernel, got {chunk_size}")


def check_half_or_fp32(*tensors: torch.Tensor) -> None:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or not dtypes <= {torch.float32, torch.bfloat16, torch.float16}:
        raise ValueError(f"q, k, v must share one dtype among fp32, bf16, fp16; got {[t.dtype for t in tensors]}")


def pad_time(chunk_size: int, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """(B, T, ...) tensors zero-padded along T to a multiple of chunk_size, contiguous. Padded tokens have
    zero keys, values, decays and write strengths, so they change nothing."""
    pad = -tensors[0].shape[1] % chunk_size
    return [F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)).contiguous() for t in tensors]


def initial_state(state: torch.Tensor | None, shape: tuple[int, ...], device) -> torch.Tensor:
    """The fp32 contiguous start state (zeros when None)."""
    if state is None:
        return torch.zeros(*shape, dtype=torch.float32, device=device)
    return state.float().contiguous()


def aot_spec(fn, constexprs: dict, dtype: str, half_args: set[str], num_warps: int, **extra) -> dict:
    """One ahead-of-time compile entry (mixer_kernels/aot.py): pointers in `half_args` take the model dtype, other
    pointers fp32; `scale` and `eps` are fp32 scalars; other scalars (T, H, NC) i32."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = f"*{dtype}" if name in half_args else "*fp32"
        else:
            signature[name] = "fp32" if name in ("scale", "eps") else "i32"
    return {"fn": fn, "name": fn.__name__, "dtype": dtype, "signature": signature, "constexprs": dict(constexprs),
            "num_warps": num_warps, **extra}


DTYPES = (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16))
