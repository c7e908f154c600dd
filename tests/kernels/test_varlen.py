"""Packed documents through the chunked recurrences (mixer_kernels/varlen.py): GLA, the gated delta rule and the
mLSTM, the PyTorch references and the Triton kernels (TRITON_INTERPRET=1, set by tests/conftest.py), with
fla's varlen layout (B = 1 over the flattened tokens, cu_seqlens). One packed call, forward and backward,
equals the token-by-token recurrence (the definition) run on each document alone; for the mLSTM's Triton
kernel, whose backward treats the max stabilisers as constants (as mlstm_kernels' does), the gradients are
those of the chunkwise reference with the same convention, on each document alone.

Documents of 1, 15, 21, 11 and 48 tokens: a one-token document, a boundary at 16 (a chunk end for L = 16),
lengths no chunk size divides, and 48 tokens spanning a whole row of the packed batch.
"""

import pytest
import torch
import torch.nn.functional as F

from mixer_kernels.delta_rule import reference as delta_ref
from mixer_kernels.delta_rule.triton import chunk_gated_delta_rule_triton
from mixer_kernels.gla import reference as gla_ref
from mixer_kernels.gla.triton import chunk_gla_triton
from mixer_kernels.mlstm import reference as mlstm_ref
from mixer_kernels.mlstm.triton import mlstm_chunkwise_triton
from mixer_kernels.varlen import RESET, ChunkAligned

LENGTHS = [1, 15, 21, 11, 48]
CU_SEQLENS = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
N, H, K, V = sum(LENGTHS), 2, 16, 20


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def inputs(op: str, seed=0) -> list[torch.Tensor]:
    """(1, N, ...) HGRN2-like GLA inputs, or Gated-DeltaNet-like delta-rule inputs, as leaves."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(1, N, *s, generator=gen)  # noqa: E731
    if op == "gla":
        g = F.logsigmoid(2.0 + 2.0 * r(H, K))
        xs = [r(H, K), 1 - g.exp(), r(H, V), g]
    elif op == "mlstm":  # heads-first (1, NH, N, ...): q, k, v, input and forget gate pre-activations
        xs = [t.transpose(1, 2) for t in (r(H, K), r(H, K), r(H, V), r(H), 3.0 + r(H))]
    else:
        xs = [F.normalize(r(H, K), dim=-1), F.normalize(r(H, K), dim=-1), r(H, V), F.logsigmoid(2.0 + r(H)),
              torch.sigmoid(r(H))]
    return [x.requires_grad_() for x in xs]


RECURRENT = {"gla": gla_ref.gla_recurrent, "delta_rule": delta_ref.delta_rule_recurrent,
             "mlstm": mlstm_ref.mlstm_recurrent}
PATHS = {
    ("gla", "reference"): gla_ref.gla_chunk,
    ("gla", "triton"): chunk_gla_triton,
    ("delta_rule", "reference"): delta_ref.delta_rule_chunk,
    ("delta_rule", "triton"): chunk_gated_delta_rule_triton,
    ("mlstm", "reference"): mlstm_ref.mlstm_chunkwise,
    ("mlstm", "triton"): mlstm_chunkwise_triton,
}
CASES = [(op, path, chunk) for op, path in PATHS
         for chunk in ((16,) if (op, path) in (("gla", "triton"), ("delta_rule", "triton")) else (16, 32, 64))]


def each_document_alone(op: str, path: str, xs: list[torch.Tensor]) -> torch.Tensor:
    """The definition on each document alone, concatenated: (1, N, H, V), or (1, H, N, V) for the mLSTM."""
    time = 2 if op == "mlstm" else 1
    if (op, path) == ("mlstm", "triton"):  # its backward's convention, in the reference, per document
        run = lambda *d: mlstm_ref.mlstm_chunkwise(*d, stabilizer_grad=False)  # noqa: E731
    else:
        run = RECURRENT[op]
    bounds = zip(CU_SEQLENS[:-1].tolist(), CU_SEQLENS[1:].tolist())
    return torch.cat([run(*(x.narrow(time, a, b - a) for x in xs))[0] for a, b in bounds], dim=time)


def projected_grads(out: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return torch.autograd.grad((out * w).sum(), leaves)


@pytest.mark.parametrize("op,path,chunk", CASES, ids=[f"{o}-{p}-L{c}" for o, p, c in CASES])
def test_one_packed_call_equals_each_document_alone(op, path, chunk):
    xs = inputs(op)
    o, state = PATHS[op, path](*xs, chunk_size=chunk, cu_seqlens=CU_SEQLENS)
    assert state is None and o.shape == ((1, H, N, V) if op == "mlstm" else (1, N, H, V))

    ref_xs = [x.detach().clone().requires_grad_() for x in xs]
    o_ref = each_document_alone(op, path, ref_xs)
    assert rel(o, o_ref) < 2e-6  # measured <= 2.6e-7 (fp32, another summation order)
    for name, a, b in zip("q k v gate gate".split(), projected_grads(o, xs), projected_grads(o_ref, ref_xs)):
        assert rel(a, b) < 1e-5, name  # measured <= 1.4e-6 (mLSTM reference), <= 4.5e-7 elsewhere
    # One call without the boundaries lets the later documents read the earlier ones: the test can see a leak.
    leaked, _ = PATHS[op, path](*xs, chunk_size=chunk)
    assert rel(leaked, o_ref) > 1e-2


def test_the_layout_starts_documents_on_chunk_boundaries_and_resets_after_each():
    lay = ChunkAligned(CU_SEQLENS, 16, "cpu")
    # 1 -> 16 slots, 15 -> 16 (its reset slot is the 16th), 21 -> 32, 11 -> 16, 48 -> 64 (whole chunks + one)
    assert lay.length == 16 + 16 + 32 + 16 + 64
    assert lay.slots[:3].tolist() == [0, 16, 17] and lay.slots[-1].item() == 16 + 16 + 32 + 16 + 47
    assert lay.reset.nonzero()[:, 0].tolist() == [15, 31, 63, 79, 143]
    g = lay.pack_decay(torch.zeros(1, N, H))
    assert (g[0, lay.reset] == RESET).all() and (g[0, ~lay.reset] == 0).all()
    assert torch.exp(torch.tensor(RESET)) == 0  # exactly: the state after a reset slot is zero


@pytest.mark.parametrize("problem,call", [
    ("batch", lambda xs: gla_ref.gla_chunk(*(x.expand(2, *x.shape[1:]) for x in xs), cu_seqlens=CU_SEQLENS)),
    ("ends at", lambda xs: gla_ref.gla_chunk(*xs, cu_seqlens=CU_SEQLENS[:-1])),
    ("initial state", lambda xs: gla_ref.gla_chunk(*xs, initial_state=torch.zeros(1, H, K, V),
                                                   cu_seqlens=CU_SEQLENS)),
])
def test_a_packed_call_outside_the_varlen_contract_is_a_clear_error(problem, call):
    with pytest.raises(ValueError, match=problem):
        call([x.detach() for x in inputs("gla")])
