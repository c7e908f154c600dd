"""TF32: the error the GPU's tensor cores add where our Triton kernels take `tl.dot(..., input_precision="tf32")`
(fp32 operands of half-precision runs: states, decayed keys, the WY factors), measured on the CPU.

Triton's interpreter ignores `input_precision`; here its dot is wrapped to drop the 13 low mantissa bits of
fp32 operands of TF32 dots (truncation, the worse of the hardware's roundings). The kernels run at real
head sizes (HGRN2 128, MoM 256; T 256 and 128) on fp16 inputs, against an fp64 reference on the same rounded inputs.

Bound: every output, state and gradient within 3e-3 rel-RMS, and at least 3x closer than with those operands
rounded to bf16, which is what flash-linear-attention's kernels do for these dots (the practice bf16
training of GLA / Gated DeltaNet models runs with). Measured with TF32: GLA up to 2.7e-3 (the decay
gradient, a difference q.dq - k.dk), else below 1.3e-3; the gated delta rule up to 1.3e-3 (its state
update k^T v_new, q S and P v_new contribute most; u - W S little); with bf16 operands 6e-3 to 1.3e-2. The
errors do not grow with T (256 and 2048 measured the same). So these dots stay TF32, not ieee (fp32 FMA
instead of tensor cores).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

BOUND = 3e-3
TF32, BF16 = 0xFFFFE000, 0xFFFF0000  # the mantissa bits each keeps of an fp32


def emulate_tf32(monkeypatch, keep: int = TF32) -> list[int]:
    """From now on, dots asked for TF32 get their fp32 operands truncated to TF32 (10 mantissa bits; with
    keep=BF16 to bf16's 7); returns their running count."""
    original = interpreter.InterpreterBuilder.create_dot
    count = [0]

    def truncate(handle):
        if handle.data.dtype != np.float32:
            return handle
        data = (handle.data.view(np.uint32) & np.uint32(keep)).view(np.float32)
        return interpreter.TensorHandle(data, handle.dtype.scalar)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if "TF32" in repr(input_precision) and "X3" not in repr(input_precision):
            count[0] += 1
            a, b = truncate(a), truncate(b)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
    return count


def check(monkeypatch, run) -> None:
    """run() -> errors, under TF32 and then under bf16 operands, against BOUND and each other."""
    count = emulate_tf32(monkeypatch)
    with_tf32 = run()
    emulate_tf32(monkeypatch, BF16)
    with_bf16 = run()
    assert count[0] > 0 and max(with_tf32) < BOUND, with_tf32
    assert all(3 * t < b for t, b in zip(with_tf32, with_bf16)), (with_tf32, with_bf16)


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def errors(fn, reference, half: list[torch.Tensor], full: list[torch.Tensor]) -> list[float]:
    """rel-RMS of outputs, final state and every gradient: fn on fp16 `half` inputs (then the fp32 rest)
    against reference in fp64 on the same values."""
    g = torch.Generator().manual_seed(7)
    ref_in = [x.double().requires_grad_() for x in half + full]
    o_ref, s_ref = reference(*ref_in)
    do, ds = torch.randn(o_ref.shape, generator=g).double(), torch.randn(s_ref.shape, generator=g).double()
    g_ref = torch.autograd.grad((o_ref * do).sum() + (s_ref * ds).sum(), ref_in)
    ins = [x.half().requires_grad_() for x in half] + [x.clone().requires_grad_() for x in full]
    o, s = fn(*ins)
    grads = torch.autograd.grad((o.double() * do).sum() + (s.double() * ds).sum(), ins)
    return [rel(o, o_ref), rel(s, s_ref)] + [rel(a, b) for a, b in zip(grads, g_ref)]


def test_gla_at_hgrn2_head_sizes(monkeypatch):
    from mixer_kernels.gla import reference
    from mixer_kernels.gla.triton import chunk_gla_triton

    g = torch.Generator().manual_seed(0)
    T, K = 256, 128
    q, v = torch.randn(1, T, 1, K, generator=g).half().float(), torch.randn(1, T, 1, K, generator=g).half().float()
    gate = F.logsigmoid(2 + 2 * torch.randn(1, T, 1, K, generator=g))
    k = (1 - gate.exp()).half().float()
    check(monkeypatch, lambda: errors(lambda q, k, v, gate: chunk_gla_triton(q, k, v, gate, chunk_size=16),
                                      lambda q, k, v, gate: reference.gla_chunk(q, k, v, gate, chunk_size=16),
                                      [q, k, v], [gate]))


def test_gated_delta_rule_at_mom_head_sizes(monkeypatch):
    from mixer_kernels.delta_rule import reference
    from mixer_kernels.delta_rule.triton import chunk_gated_delta_rule_triton

    g = torch.Generator().manual_seed(0)
    T, K = 128, 256
    q, k = (F.normalize(torch.randn(1, T, 1, K, generator=g), dim=-1).half().float() for _ in range(2))
    v = torch.randn(1, T, 1, K, generator=g).half().float()
    gate, beta = F.logsigmoid(4 + torch.randn(1, T, 1, generator=g)), torch.rand(1, T, 1, generator=g)
    check(monkeypatch, lambda: errors(
        lambda q, k, v, gate, beta: chunk_gated_delta_rule_triton(q, k, v, gate, beta, chunk_size=16),
        lambda q, k, v, gate, beta: reference.delta_rule_chunk(q, k, v, gate, beta, chunk_size=16),
        [q, k, v], [gate, beta]))


def test_the_emulation_is_not_a_no_op(monkeypatch):
    """The same GLA run is several times further from the reference with TF32 than without: the wrapped dot
    does round."""
    from mixer_kernels.gla import reference
    from mixer_kernels.gla.triton import chunk_gla_triton

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 64, 1, 128, generator=g).half() for _ in range(3))
    gate = F.logsigmoid(2 + torch.randn(1, 64, 1, 128, generator=g))
    _, s_ref = reference.gla_chunk(q.double(), k.double(), v.double(), gate.double(), chunk_size=16)
    exact = rel(chunk_gla_triton(q, k, v, gate)[1], s_ref)  # the fp32 state: no output rounding in the way
    emulate_tf32(monkeypatch)
    assert rel(chunk_gla_triton(q, k, v, gate)[1], s_ref) > 10 * exact
