"""Decoding with the recurrent state: chunked prefill, then one `model.step` per generated token.

Memory of a recurrent family (mLSTM, Mamba, Mamba-2) stays constant in the number of generated tokens,
because `step` carries a fixed-size state instead of re-reading the sequence; attention's state is its KV
cache, which grows by one entry per token. `state_nbytes` measures that state directly (tensor bytes),
which is what the constant-memory claim is about (RSS would be dominated by allocator noise).
"""

from collections.abc import Callable
from dataclasses import fields, is_dataclass

import torch


def state_nbytes(state) -> int:
    """Bytes of every tensor in a (nested) decoding state: dataclasses, named tuples, lists, dicts."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if is_dataclass(state):
        return sum(state_nbytes(getattr(state, f.name)) for f in fields(state))
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(state_nbytes(v) for v in state)
    return 0


@torch.no_grad()
def prefill(model, ids: torch.Tensor, chunk_size: int | None = None) -> tuple[torch.Tensor, list]:
    """Run the prompt ids (B, T) through the model -> logits of the last position (B, V) and the state.

    With `chunk_size`, the prompt goes through in pieces that continue each other's state, so activation
    memory is bounded by the chunk rather than the prompt (every family's forward accepts a state).
    """
    chunk = chunk_size or ids.shape[1]
    state = None
    for start in range(0, ids.shape[1], chunk):
        out = model(ids[:, start:start + chunk], state=state, return_state=True)
        state = out.state
    return out.logits[:, -1].float(), state


@torch.no_grad()
def generate_tokens(
    model,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    eos_id: int | None = None,
    is_done: Callable[[list[int]], bool] | None = None,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    on_step: Callable[[int, list], None] | None = None,
) -> list[list[int]]:
    """Generate up to `max_new_tokens` after each prompt row (B, T) of equal length; returns new tokens per row.

    Greedy when temperature == 0, else sampling from softmax(logits / temperature). A row stops at `eos_id`
    (not included) or once `is_done(its tokens)` holds; decoding ends when every row stopped. `on_step(i,
    state)` sees the state after each step (used to measure its size).
    """
    logits, state = prefill(model, prompt, chunk_size)
    rows = prompt.shape[0]
    out: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    for i in range(max_new_tokens):
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            token = logits.argmax(-1)
        for r, t in enumerate(token.tolist()):
            if done[r]:
                continue
            if t == eos_id:
                done[r] = True
                continue
            out[r].append(t)
            done[r] = is_done is not None and is_done(out[r])
        if all(done) or i == max_new_tokens - 1:
            break
        logits, state = model.step(token, state)
        logits = logits.float()
        if on_step is not None:
            on_step(i, state)
    return out
