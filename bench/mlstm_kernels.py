"""Benchmark of the mLSTM chunkwise op: our Triton kernel vs the PyTorch reference vs NX-AI's mlstm_kernels.

Times forward and forward+backward and prints each against our Triton kernel. Numbers only mean
something on a GPU; on the CPU the default tiny size just checks that the script runs (the Triton
path then needs TRITON_INTERPRET=1 and is skipped without it).

    python bench/mlstm_kernels.py                                 # tiny, CPU ok
    python bench/mlstm_kernels.py --batch 8 --heads 8 --seq 4096 --dqk 256 --dv 512 --dtype bf16
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

# This file is named like NX-AI's package: drop bench/ from the path so `import mlstm_kernels` finds theirs.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from mixer_kernels.mlstm import reference  # noqa: E402


def _timeit(fn, repeats: int, sync) -> float:
    fn()  # warm-up (compilation)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--dqk", type=int, default=32)
    p.add_argument("--dv", type=int, default=32)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    B, NH, T = args.batch, args.heads, args.seq
    q = torch.randn(B, NH, T, args.dqk, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, NH, T, args.dqk, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, NH, T, args.dv, device=device, dtype=dtype, requires_grad=True)
    i = torch.randn(B, NH, T, device=device, requires_grad=True)
    f = (3.0 + torch.randn(B, NH, T, device=device)).requires_grad_()
    dh = torch.randn(B, NH, T, args.dv, device=device, dtype=dtype)

    ops = {"reference": lambda: reference.mlstm_chunkwise(q, k, v, i, f, chunk_size=args.chunk)[0]}
    if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        from mixer_kernels.mlstm.triton import mlstm_chunkwise_triton

        ops["triton (ours)"] = lambda: mlstm_chunkwise_triton(q, k, v, i, f, chunk_size=args.chunk)[0]
    try:  # NX-AI's kernels need T divisible by their chunk size
        from mlstm_kernels.torch.chunkwise import registry

        native = registry["native_custbw"]
        ops["mlstm_kernels native_custbw"] = lambda: native(q, k, v, i, f, chunk_size=args.chunk)
        if device == "cuda" and "triton_xl_chunk" in registry:
            xl = registry["triton_xl_chunk"]
            ops["mlstm_kernels triton_xl_chunk"] = lambda: xl(q, k, v, i, f, chunk_size=args.chunk)
    except ImportError:
        pass

    print(f"mLSTM chunkwise B={B} NH={NH} T={T} DQK={args.dqk} DV={args.dv} chunk={args.chunk} "
          f"{args.dtype} on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}")
    results = {}
    for name, op in ops.items():
        try:
            fw = _timeit(lambda op=op: op(), args.repeats, sync)
            fwbw = _timeit(lambda op=op: torch.autograd.grad(op(), (q, k, v, i, f), dh), args.repeats, sync)
        except Exception as e:  # noqa: BLE001 - one failing backend must not hide the others
            print(f"  {name:32s} failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        results[name] = (fw, fwbw)
    base = results.get("triton (ours)")
    for name, (fw, fwbw) in results.items():
        ratio = f"   x{fw / base[0]:.2f} / x{fwbw / base[1]:.2f} vs ours" if base else ""
        print(f"  {name:32s} fw {fw:9.3f} ms   fw+bw {fwbw:9.3f} ms{ratio}")


if __name__ == "__main__":
    main()
