"""Packed documents (models/documents.py): a packed forward and backward equals running each document alone.

For every family's tiny model (so every mixer, and BST's and SCOUT's hybrids, with the kernel paths the
CPU takes: the references, Mamba-2's with seq_idx, the mLSTM's, HGRN2's and Gated DeltaNet's with
cu_seqlens; the Triton
and CUDA-package paths take the same per-document batches, seq_idx or cu_seqlens, checked kernel by kernel
in tests/kernels/test_varlen.py and test_cuda_packages.py): logits and every parameter gradient of a packed batch against each document run as its
own sequence, in fp32 (fp32 rounding only: the batch shapes differ); a packed prefill gives each
document's decoding state. The layout has a document of length 1, one ending exactly on a 16-token chunk
boundary, lengths that no chunk size divides, and a row that is one document. Inconsistent boundaries are
a clear error naming the batch field before any kernel runs.
"""

import pytest
import torch
import torch.nn.functional as F
import yaml
from harness import TINY, rel_err

from mixer_kernels import backend
from models import CausalLM, ModelConfig
from models.documents import Documents, DocumentsError

FAMILIES = sorted(p.stem for p in TINY.glob("*.yaml"))
EVERY_LETTER = {"pattern": "AXMmHRWBSG", "n_layers": 10, "hgrn2": {"expand_ratio": 16},
                "gated_deltanet": {"head_dim": 16}}  # on the tiny hybrid
T = 48
ROWS = [[1, 15, 21, 11], [T]]  # boundaries at 1, 16 (a chunk end), 37; then one document for the whole row


def tiny_model(family: str, **changes) -> CausalLM:
    torch.manual_seed(0)
    if family == "every-letter":
        family, changes = "hybrid", EVERY_LETTER
    cfg = ModelConfig(**yaml.safe_load((TINY / f"{family}.yaml").read_text())["model"] | changes)
    return CausalLM(cfg)


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="sum")


def grads(model: CausalLM) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out


def assert_packed_equals_each_document_alone(model: CausalLM) -> None:
    ids, labels = torch.randint(0, model.cfg.vocab_size, (2, len(ROWS), T))
    lengths = torch.tensor([n for row in ROWS for n in row])
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])

    packed = model(ids, cu_seqlens=cu_seqlens).logits
    loss_sum(packed, labels).backward()
    packed_grads = grads(model)

    pieces, targets = (t.flatten().split(lengths.tolist()) for t in (ids, labels))
    alone = [model(piece[None]).logits[0] for piece in pieces]
    sum(loss_sum(a, y) for a, y in zip(alone, targets, strict=True)).backward()
    alone_grads = grads(model)

    assert rel_err(packed.flatten(0, 1), torch.cat(alone)) < 3e-6  # measured <= 2.6e-7 (xLSTM)
    assert packed_grads.keys() == alone_grads.keys()  # every parameter but an unused HGRN2 lower bound
    assert len(packed_grads) >= len(list(model.parameters())) - 1
    worst = max(alone_grads, key=lambda n: rel_err(packed_grads[n], alone_grads[n]))
    assert rel_err(packed_grads[worst], alone_grads[worst]) < 1e-5, worst  # measured <= 1.5e-6 (MoM)
    # Without the boundaries the later documents read the earlier ones: the test can see a leak.
    assert rel_err(model(ids).logits.flatten(0, 1), torch.cat(alone)) > 1e-3


@pytest.mark.parametrize("family", [*FAMILIES, "every-letter"])
def test_packed_forward_and_backward_equal_each_document_alone(family):
    assert_packed_equals_each_document_alone(tiny_model(family))


@pytest.mark.parametrize("family,op", [("xlstm", "mlstm"), ("hgrn2", "gla"), ("gated_deltanet", "delta_rule")])
def test_packed_documents_through_our_triton_kernels(family, op):
    """The same through the mixers with our Triton kernels (TRITON_INTERPRET=1 on the CPU), which take the
    packed rows in one call with cu_seqlens (mixer_kernels/varlen.py), and the documents alone the usual way."""
    with backend.using(overrides={op: "fast"}):
        assert_packed_equals_each_document_alone(tiny_model(family))


@torch.no_grad()
def test_a_packed_prefill_gives_each_document_its_own_state():
    """The hybrid with every letter: the packed prefill's logits are the packed forward's, and one step from a
    document's state gives the logits of that document run with the next token appended."""
    model = tiny_model("every-letter").eval()
    ids = torch.randint(0, model.cfg.vocab_size, (len(ROWS), T))
    lengths = [n for row in ROWS for n in row]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    out = model(ids, cu_seqlens=cu_seqlens, return_state=True)
    assert rel_err(out.logits, model(ids, cu_seqlens=cu_seqlens).logits) < 3e-6
    assert len(out.state) == len(lengths)
    nxt = torch.randint(0, model.cfg.vocab_size, (len(lengths),))
    for doc, state, token in zip(ids.flatten().split(lengths), out.state, nxt, strict=True):
        logits, _ = model.step(token[None], state)
        expected = model(torch.cat([doc, token[None]])[None]).logits[:, -1]
        assert rel_err(logits, expected) < 1e-5


def test_mom_load_balancing_is_over_the_batch_tokens_not_padding():
    model = tiny_model("mom", n_layers=1)  # one layer: its input is the same, packed or not
    ids = torch.randint(0, model.cfg.vocab_size, (1, T))
    whole = model(ids).aux_loss  # the router is per token: packing changes nothing it sees
    packed = model(ids, cu_seqlens=torch.tensor([0, 1, 16, 37, T])).aux_loss
    assert rel_err(packed, whole) < 1e-6


def test_positions_restart_at_each_document():
    docs = Documents.from_cu_seqlens(torch.tensor([0, 3, 4, 5, 8]), batch=2, length=4)
    assert docs.position_ids.tolist() == [[0, 1, 2, 0], [0, 0, 1, 2]]


@pytest.mark.parametrize("cu, problem", [
    ([0, 5, 3, 8], "strictly increasing"),
    ([0, 3, 7], "end at the batch's token count 8"),
    ([1, 3, 8], "start at 0"),
    ([0, 3, 6, 8], "longer than the row"),  # 3..6 runs over row 0's end at 4
    ([[0, 4, 8]], "1-D integer tensor"),
])
def test_inconsistent_boundaries_are_a_clear_error_naming_the_field(cu, problem):
    model = tiny_model("transformer")
    with pytest.raises(DocumentsError, match=problem) as e:
        model(torch.zeros(2, 4, dtype=torch.long), cu_seqlens=torch.tensor(cu))
    assert "batch field 'cu_seqlens'" in str(e.value)
