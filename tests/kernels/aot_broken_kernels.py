"""Kernels that must fail the ahead-of-time check: it proves the check can fail (tests/kernels/test_aot.py)."""

import triton
import triton.language as tl


@triton.jit
def dot_too_small(a_ptr, b_ptr, c_ptr, M: tl.constexpr):
    # tl.dot needs every dimension >= 16; M = 8 is below that.
    idx = tl.arange(0, M)
    a = tl.load(a_ptr + idx[:, None] * M + idx[None, :])
    b = tl.load(b_ptr + idx[:, None] * M + idx[None, :])
    tl.store(c_ptr + idx[:, None] * M + idx[None, :], tl.dot(a, b))


@triton.jit
def _tiled_matmul(a_ptr, b_ptr, c_ptr, K, BLOCK: tl.constexpr):
    idx = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k in range(0, K, BLOCK):
        a = tl.load(a_ptr + idx[:, None] * K + (k + idx[None, :]))
        b = tl.load(b_ptr + (k + idx[:, None]) * BLOCK + idx[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + idx[:, None] * BLOCK + idx[None, :], acc)


@triton.jit
def shared_memory_too_large(a_ptr, b_ptr, c_ptr, K, BLOCK: tl.constexpr):
    # Two pipelined fp32 operand tiles of 256 x 256 need far more than 227 KiB of shared memory.
    _tiled_matmul(a_ptr, b_ptr, c_ptr, K, BLOCK)


@triton.jit
def int32_offsets(a_ptr, c_ptr, N, BLOCK: tl.constexpr):
    # The offset of row pid is computed in 32 bits: past 2^31 elements it wraps (today's bug, before widening).
    pid = tl.program_id(0)
    idx = tl.arange(0, BLOCK)
    tl.store(c_ptr + pid * N + idx, tl.load(a_ptr + pid * N + idx))


@triton.jit
def register_tile_too_large(a_ptr, b_ptr, c_ptr, K, BLOCK: tl.constexpr):
    # A (128, 128) fp32 accumulator in one warp: 512 values a thread, past the 255 registers it may have.
    _tiled_matmul(a_ptr, b_ptr, c_ptr, K, BLOCK)


_SIG = {"a_ptr": "*fp32", "b_ptr": "*fp32", "c_ptr": "*fp32"}
AOT_KERNELS = [
    {"fn": dot_too_small, "name": "dot_too_small", "dtype": "fp32", "num_warps": 4,
     "signature": {**_SIG, "M": "constexpr"}, "constexprs": {"M": 8}},
    {"fn": shared_memory_too_large, "name": "shared_memory_too_large", "dtype": "fp32", "num_warps": 8,
     "signature": {**_SIG, "K": "i32", "BLOCK": "constexpr"}, "constexprs": {"BLOCK": 256}},
    {"fn": int32_offsets, "name": "int32_offsets", "dtype": "fp32", "num_warps": 4,
     "signature": {"a_ptr": "*fp32", "c_ptr": "*fp32", "N": "i32", "BLOCK": "constexpr"}, "constexprs": {"BLOCK": 32}},
    {"fn": register_tile_too_large, "name": "register_tile_too_large", "dtype": "fp16", "num_warps": 1,
     "signature": {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "K": "i32", "BLOCK": "constexpr"},
     "constexprs": {"BLOCK": 128}},
]
