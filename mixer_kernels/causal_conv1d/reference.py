"""Reference depthwise causal convolution in PyTorch: whole sequence with a carried state, and one step.

Same contract as causal-conv1d's `causal_conv1d_fn` / `causal_conv1d_update`, except that the state is
returned rather than written in place. The state is the last W-1 inputs, oldest first.
"""

import torch
import torch.nn.functional as F


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    return y if activation is None else F.silu(y)


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    activation: str | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y[b, c, t] = act(bias[c] + sum_k weight[c, k] * x[b, c, t - W + 1 + k]); x before t=0 from the state.

    x: (B, C, T); weight: (C, W); bias: (C,) or None; initial_state: (B, C, W-1) or None (zeros).
    seq_idx: (B, T) document index of each token, or None: packed documents, as causal-conv1d takes them; a
    tap on another document reads zero (the initial state belongs to the row's first document).
    Returns y (B, C, T) in x's dtype and the final state (B, C, W-1), the last W-1 inputs (of the last
    document, zero before its start, under seq_idx).
    """
    width = weight.shape[1]
    if initial_state is None:
        x_padded = F.pad(x, (width - 1, 0))  # (B, C, W-1+T)
    else:
        x_padded = torch.cat([initial_state.to(x.dtype), x], dim=-1)
    if seq_idx is None:
        # Compute in the weight's dtype, as causal-conv1d and transformers do.
        y = F.conv1d(x_padded.to(weight.dtype), weight.unsqueeze(1), bias, groups=weight.shape[0])  # (B, C, T)
        # clone: the state must not keep the whole padded sequence alive.
        return _activate(y, activation).to(x.dtype), x_padded[..., x_padded.shape[-1] - (width - 1):].clone()
    seq_padded = padded_seq_idx(seq_idx, width, initial_state is not None)  # (B, W-1+T)
    same = seq_padded.unfold(-1, width, 1) == seq_idx[..., None]  # (B, T, W): taps on this token's document
    windows = x_padded.to(weight.dtype).unfold(-1, width, 1)  # (B, C, T, W), a view
    y = torch.einsum("bctw,btw,cw->bct", windows, same.to(weight.dtype), weight)
    if bias is not None:
        y = y + bias[:, None]
    return _activate(y, activation).to(x.dtype), last_document_state(x_padded, seq_padded, seq_idx, width)


def padded_seq_idx(seq_idx: torch.Tensor, width: int, has_initial_state: bool) -> torch.Tensor:
    """(B, T) -> (B, W-1+T): the document of each of the W-1 inputs before the row (the first document's, from
    an initial state; none, -1, from zero padding), then seq_idx."""
    before = seq_idx[:, :1] if has_initial_state else torch.full_like(seq_idx[:, :1], -1)
    return torch.cat([before.expand(-1, width - 1), seq_idx], dim=-1)


def last_document_state(x_padded: torch.Tensor, seq_padded: torch.Tensor, seq_idx: torch.Tensor,
                        width: int) -> torch.Tensor:
    """The final state under seq_idx: the last W-1 inputs of x_padded (B, C, W-1+T), zero where they belong
    to another document than the row's last (seq_padded: `padded_seq_idx`)."""
    tail = seq_padded[:, -(width - 1):] == seq_idx[:, -1:]  # (B, W-1)
    return x_padded[..., -(width - 1):] * tail[:, None].to(x_padded.dtype)


def causal_conv1d_update_ref(
    x_t: torch.Tensor,
    state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of `causal_conv1d_ref`. x_t (B, C), state (B, C, W-1) -> y_t (B, C), new state (B, C, W-1)."""
    window = torch.cat([state.to(x_t.dtype), x_t[..., None]], dim=-1)  # (B, C, W)
    y = (window.to(weight.dtype) * weight).sum(-1)
    if bias is not None:
        y = y + bias
    return _activate(y, activation).to(x_t.dtype), window[..., 1:]
