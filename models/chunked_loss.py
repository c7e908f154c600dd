"""The LM head and the next-token loss together, a chunk of tokens at a time: no (B, T, V) logits in training.

At xLSTM-7B's T = 8192 and V = 50304 one sequence's fp32 logits are 1.6 GB, and their gradient as much again;
at 125M sizes the LM head's activations dominate the step. As flash-linear-attention's and Liger's fused
linear cross-entropy do, the forward walks the tokens in chunks: each chunk's logits (in the head's dtype,
then fp32, as the unfused path), the optional soft cap, log-sum-exp and the loss, and at once the gradients
of the (mean) loss with respect to the chunk's hidden states and the head weight (softmax minus one-hot,
through the cap), so the chunk's logits are freed before the next one. The backward only scales the stored
gradients by the incoming one. Peak memory: two (chunk, V) fp32 buffers (the logits and their softmax, reused
by every chunk) plus an (N, D) and a (V, D) gradient, instead of (N, V) logits, their softmax and their gradient.
"""

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100  # labels that carry no loss (lm_loss's ignore_index)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens: int, soft_cap: float | None):
        """hidden (N, D), weight (V, D), labels (N,) -> mean cross-entropy over labels != -100 (fp32 scalar)."""
        valid = labels != IGNORE
        count = valid.sum().clamp_min(1).float()  # stays on the device: no host sync
        loss = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        # (chunk, V) fp32 buffers reused by every chunk, written in place: on the CPU a fresh tensor of that size
        # costs more in page faults than the pass that fills it.
        raw = torch.empty(min(chunk_tokens, hidden.shape[0]), weight.shape[0], dtype=torch.float32,
                          device=hidden.device)
        probs = torch.empty_like(raw)
        for start in range(0, hidden.shape[0], chunk_tokens):
            h, y, keep = (t[start:start + chunk_tokens] for t in (hidden, labels, valid))
            n, target = h.shape[0], y.clamp_min(0)[:, None]
            logits = raw[:n]
            if weight.dtype == torch.float32:
                torch.mm(h, weight.t(), out=logits)
            else:  # the head's dtype, then fp32, as the unfused path
                logits.copy_(F.linear(h, weight))
            # d loss / d logits = (softmax - onehot) / count on kept tokens, built in place: `grad` holds the
            # softmax times `norm` (to be divided out), `scale` the row weights.
            scale = (keep / count)[:, None]
            if soft_cap is None:
                log_p = torch.log_softmax(logits, dim=-1, out=probs[:n])
                token_loss = -log_p.gather(1, target)[:, 0]
                grad, norm = log_p.exp_(), 1
            else:
                # cap tanh(x / cap) = 2 cap sigmoid(2 x / cap) - cap, and the constant drops out of the softmax:
                # logits 2 cap s with s = sigmoid(2 x / cap). On the CPU sigmoid is several times faster than
                # tanh, and s bounds the logits, so a row's max of s is its softmax shift.
                s = logits.mul_(2 / soft_cap).sigmoid_()
                shift = s.amax(1, keepdim=True)
                grad = torch.add(shift * (-2 * soft_cap), s, alpha=2 * soft_cap, out=probs[:n]).exp_()
                norm = grad.sum(1, keepdim=True)
                token_loss = (norm.log() - 2 * soft_cap * (s.gather(1, target) - shift))[:, 0]
                scale = scale * 4  # through the cap, d(2 cap s) / dx = 4 s (1 - s): the 4 here, s (1 - s) below
            loss = loss + (token_loss * keep).sum()
            grad.mul_(scale / norm).scatter_add_(1, target, -scale)
            if soft_cap is not None:
                grad.mul_(s.addcmul_(s, s, value=-1))
            grad_hidden[start:start + chunk_tokens] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
            grad_weight.addmm_(grad.t(), h.float())
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight * grad_loss.to(grad_weight.dtype), \
            None, None, None


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                    soft_cap: float | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of the LM head `weight` (V, D) on hidden states (..., D) against labels
    (...): the value and gradients of lm_loss(head(hidden), labels), without its logits."""
    return ChunkedLinearCrossEntropy.apply(hidden.flatten(0, -2), weight, labels.flatten(), chunk_tokens, soft_cap)


class LMHead(nn.Linear):
    """The LM head: logits, or with labels the chunked loss. The loss goes through this module's forward so
    that ZeRO-3, which gathers a module's parameters around its forward and backward, has the weight whole
    when the loss's gradient reaches it."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, chunk_tokens: int = 1024,
                soft_cap: float | None = None) -> torch.Tensor:
        if labels is None:
            return F.linear(x, self.weight)
        return chunked_lm_loss(x, self.weight, labels, chunk_tokens, soft_cap)
