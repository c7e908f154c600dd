"""Our GLA and gated-delta-rule Triton chunk kernels against flash-linear-attention's, forward and backward.

On a GPU: checks agreement with fla's `chunk_gla` / `chunk_gated_delta_rule` (relative RMSE of outputs,
final states and every gradient) and prints milliseconds and the ratio ours / fla at HGRN2-like and
MoM-like shapes. Without a GPU it still completes: tiny shapes, our kernels under the Triton interpreter
against fla's naive PyTorch ops (timings then mean nothing).

    python bench/kernels_gpu.py [--dtype bf16] [--T 4096]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixer_kernels.delta_rule.triton import chunk_gated_delta_rule_triton  # noqa: E402
from mixer_kernels.gla.triton import chunk_gla_triton  # noqa: E402


def rel_rmse(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def timed(fn, cuda: bool, reps: int) -> float:
    """Median milliseconds of fn() over reps runs after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def gla_inputs(B, T, H, K, V, dtype, device):
    q = torch.randn(B, T, H, K, device=device)
    g = F.logsigmoid(2 + 2 * torch.randn(B, T, H, K, device=device))
    k = 1 - g.exp()
    v = torch.randn(B, T, H, V, device=device)
    return [x.to(dtype).requires_grad_() for x in (q, k, v)] + [g.requires_grad_()]


def gdr_inputs(B, T, H, K, V, dtype, device):
    q = F.normalize(torch.randn(B, T, H, K, device=device), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, device=device), dim=-1)
    v = torch.randn(B, T, H, V, device=device)
    g = F.logsigmoid(2 + torch.randn(B, T, H, device=device))
    beta = torch.rand(B, T, H, device=device)
    return [x.to(dtype).requires_grad_() for x in (q, k, v)] + [g.requires_grad_(), beta.requires_grad_()]


def compare(name, ours, theirs, inputs, cuda, reps):
    """Agreement (outputs, final state, gradients) and forward / forward+backward times. A failure of
    fla's side (e.g. its Hopper guard for Triton < 3.7.1 in the gated backward) is printed, not fatal."""

    def fwd(fn):
        with torch.no_grad():
            fn(*inputs)

    def fwd_bwd(fn):
        o, s = fn(*inputs)
        torch.autograd.grad(o.float().sum() + s.float().sum(), inputs)

    o1, s1 = ours(*inputs)
    do, ds = torch.randn_like(o1.float()), torch.randn_like(s1)
    g1 = torch.autograd.grad((o1.float() * do).sum() + (s1 * ds).sum(), inputs)
    try:
        o2, s2 = theirs(*inputs)
        errs = {"o": rel_rmse(o1, o2), "state": rel_rmse(s1, s2)}
        g2 = torch.autograd.grad((o2.float() * do).sum() + (s2.float() * ds).sum(), inputs)
        errs.update({f"d{i}": rel_rmse(a, b) for i, a, b in zip(range(len(inputs)), g1, g2)})
    except Exception as err:  # noqa: BLE001 - report and go on with what ran
        errs = {"fla failed": f"{type(err).__name__}: {str(err)[:160]}"}
    print(f"{name}: rel RMSE vs fla " + " ".join(f"{k}={v:.1e}" if isinstance(v, float) else f"{k}: {v}"
                                                for k, v in errs.items()), flush=True)
    for label, run in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        t_ours = timed(lambda run=run: run(ours), cuda, reps)
        try:
            t_fla = timed(lambda run=run: run(theirs), cuda, reps)
        except Exception as err:  # noqa: BLE001
            print(f"  {label:8s} ours {t_ours:9.2f} ms   fla failed ({type(err).__name__})", flush=True)
            continue
        print(f"  {label:8s} ours {t_ours:9.2f} ms   fla {t_fla:9.2f} ms   ours/fla {t_ours / t_fla:5.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--T", type=int, default=4096)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype] if cuda else torch.float32
    if cuda:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_gdr
        from fla.ops.gla import chunk_gla as fla_gla

        def theirs_gla(q, k, v, g):
            return fla_gla(q, k, v, g, output_final_state=True)

        def theirs_gdr(q, k, v, g, beta):
            return fla_gdr(q, k, v, g, beta, output_final_state=True)

        # HGRN2-1.3B-like: d_model 2048, expand 128 -> 16 heads of K = V = 128; MoM-like: 4 heads of 256.
        gla_shape, gdr_shape, reps = (4, args.T, 16, 128, 128), (4, args.T, 4, 256, 256), 10
    else:
        from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
        from fla.ops.gla.naive import naive_recurrent_gla

        def theirs_gla(q, k, v, g):
            return naive_recurrent_gla(q, k, v, g, output_final_state=True)

        def theirs_gdr(q, k, v, g, beta):
            return naive_recurrent_gated_delta_rule(q, k, v, beta, g, output_final_state=True)

        gla_shape, gdr_shape, reps = (1, 64, 2, 32, 32), (1, 64, 2, 32, 32), 1
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu (Triton interpreter; timings meaningless)'}, "
          f"dtype {dtype}")
    compare(f"GLA {gla_shape}", chunk_gla_triton, theirs_gla, gla_inputs(*gla_shape, dtype, device), cuda, reps)
    compare(f"gated delta rule {gdr_shape}", chunk_gated_delta_rule_triton, theirs_gdr,
            gdr_inputs(*gdr_shape, dtype, device), cuda, reps)


if __name__ == "__main__":
    main()
