"""The chunked LM head + loss (models/chunked_loss.py) against the plain path: F.linear then F.cross_entropy over
the whole (N, V) logits, which PyTorch computes (not this project): loss and gradients in fp32 and bf16, with
ignored labels, a soft cap, tied embeddings and a chunk that does not divide the tokens; and through the LM."""

import pytest
import torch
import torch.nn.functional as F
from harness import rel_err

from models import CausalLM, ModelConfig
from models.chunked_loss import chunked_lm_loss


def plain(hidden, weight, labels, soft_cap=None):
    logits = F.linear(hidden, weight).float()
    if soft_cap is not None:
        logits = soft_cap * torch.tanh(logits / soft_cap)
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100)


# Measured: fp32 gradients 2.7e-7 apart; bf16 4.5e-3 (one bf16 rounding of the gradients, in either order).
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("soft_cap", [None, 5.0])
def test_loss_and_gradients_equal_the_unchunked_ones(dtype, tol, soft_cap):
    torch.manual_seed(0)
    hidden = torch.randn(3, 37, 32, dtype=dtype, requires_grad=True)
    weight = (torch.randn(101, 32) * 0.3).to(dtype).requires_grad_()
    labels = torch.randint(0, 101, (3, 37))
    labels[0, :5] = -100  # ignored positions carry no loss and no gradient
    results = []
    for fn in (lambda: plain(hidden, weight, labels, soft_cap), lambda: chunked_lm_loss(hidden, weight, labels, 16, soft_cap)):
        loss = fn()
        (loss * 1.7).backward()  # a scaled loss: the backward scales the stored gradients
        results.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
        hidden.grad, weight.grad = None, None
    (ref, ref_h, ref_w), (got, got_h, got_w) = results
    assert rel_err(got, ref) < 1e-6  # measured <= 8e-8
    assert rel_err(got_h, ref_h) < tol and rel_err(got_w, ref_w) < tol
    assert got_h[0, :5].abs().max() == 0


def test_the_lm_trains_on_the_chunked_loss_as_on_the_logits():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, tie_embeddings=True, logits_soft_cap=30.0,
                      loss_chunk_tokens=24)
    model = CausalLM(cfg)
    ids, labels = torch.randint(0, 97, (2, 2, 40))
    grads = []
    for return_logits in (True, False):
        out = model(ids, labels=labels, return_logits=return_logits)
        assert (out.logits is None) == (not return_logits)
        out.loss.backward()
        grads.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad()
    (ref, ref_grads), (got, got_grads) = grads
    assert rel_err(got, ref) < 1e-6
    for name, grad in ref_grads.items():
        assert rel_err(got_grads[name], grad) < 1e-6, name  # measured <= 5.0e-7 (the cap as a sigmoid)
