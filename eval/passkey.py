"""Passkey retrieval (Mohtashami & Jaggi, 2023) as a needle-in-a-haystack grid over prompt length and depth.

The prompt is their template: an instruction, a repeated filler paragraph ("The grass is green. ..."),
with the needle "The pass key is 12345. Remember it. 12345 is the pass key." inserted after a fraction
`depth` of the filler, then "What is the pass key? The pass key is". The answer is " 12345". Filler is
repeated as often as fits in the target length (the prompt never exceeds it; its real length is reported).

Scoring, per (length, depth) cell over `trials` random 5-digit keys:
- `accuracy`: the answer tokens are exactly what greedy decoding produces. Computed teacher-forced in one
  forward over prompt + answer (the argmax at every answer position equals the answer token), which is the
  same event as greedy generation emitting the answer, without a decoding loop.
- `answer_logprob`: mean log-probability per answer token, a graded signal where accuracy is still 0.
Answer tokens are those of encode(prompt + answer) past encode(prompt), as lm-eval splits continuations.

`read_twice` is JRT-Prompt (Arora et al., 2024, "Just read twice"), as the lm-eval adapter applies it: the
whole prompt (haystack and question) is given twice, separated by a blank line, and the answer follows the
second question; `length` bounds one reading, so the prompt is about twice as long.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important info there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
ANSWER = " {key}"
JRT_SEPARATOR = "\n\n"  # between the two readings (eval/lm_eval_adapter.py uses the same)


@dataclass
class PasskeyPrompt:
    prompt: list[int]
    answer: list[int]
    key: str


def build_prompt(encode: Callable[[str], list[int]], length: int, depth: float, key: str,
                 read_twice: bool = False) -> PasskeyPrompt:
    """The longest prompt of at most `length` tokens, needle after round(depth * repeats) filler paragraphs
    (then that prompt twice under `read_twice`)."""

    def text(repeats: int) -> str:
        at = round(depth * repeats)
        return INTRO + FILLER * at + NEEDLE.format(key=key) + FILLER * (repeats - at) + QUESTION

    per_filler = max(1, len(encode(FILLER * 8)) // 8)
    repeats = max(0, (length - len(encode(text(0)))) // per_filler + 1)
    while repeats > 0 and len(encode(text(repeats))) > length:
        repeats -= 1
    prompt_text = text(repeats)
    prompt = encode(prompt_text)
    if len(prompt) > length:
        raise ValueError(f"passkey: even without filler the prompt takes {len(prompt)} tokens > length {length}")
    if read_twice:
        prompt_text = prompt_text + JRT_SEPARATOR + prompt_text
        prompt = encode(prompt_text)
    whole = encode(prompt_text + ANSWER.format(key=key))
    return PasskeyPrompt(prompt, whole[len(prompt):], key)


@torch.no_grad()
def score_prompt(model, p: PasskeyPrompt, chunk_size: int | None = None) -> tuple[bool, float]:
    """(greedy decoding would emit the answer, mean log-prob per answer token)."""
    device = next(model.parameters()).device
    ids = torch.tensor([p.prompt + p.answer[:-1]], device=device)
    chunk = chunk_size or ids.shape[1]
    state, logits = None, []
    for start in range(0, ids.shape[1], chunk):
        out = model(ids[:, start:start + chunk], state=state, return_state=True)
        state = out.state
        logits.append(out.logits.float())
    answer_logits = torch.cat(logits, dim=1)[0, len(p.prompt) - 1:]  # (len(answer), V)
    target = torch.tensor(p.answer, device=device)
    logprobs = F.log_softmax(answer_logits, dim=-1).gather(1, target[:, None])[:, 0]
    return bool((answer_logits.argmax(-1) == target).all()), logprobs.mean().item()


def passkey_grid(model, encode: Callable[[str], list[int]], lengths: list[int], depths: list[float],
                 trials: int = 5, seed: int = 0, chunk_size: int | None = None, read_twice: bool = False) -> dict:
    """{lengths, depths, cells: [{length, depth, prompt_tokens, accuracy, answer_logprob}], skipped}.

    The keys of trial t are the same in every cell (drawn once from `seed`), so cells differ only in
    length and depth.
    """
    rng = np.random.default_rng(seed)
    keys = [str(k) for k in rng.integers(10000, 100000, size=trials)]
    # The template itself (no filler) must fit; shorter lengths are reported as skipped, not failed.
    shortest = len(encode(INTRO + NEEDLE.format(key=keys[0]) + QUESTION)) + 2
    skipped = sorted(L for L in lengths if L < shortest)
    lengths = [L for L in lengths if L >= shortest]
    cells = []
    for length in lengths:
        for depth in depths:
            hits, logps, sizes = [], [], []
            for key in keys:
                p = build_prompt(encode, length, depth, key, read_twice)
                hit, logp = score_prompt(model, p, chunk_size)
                hits.append(hit)
                logps.append(logp)
                sizes.append(len(p.prompt))
            cells.append({"length": length, "depth": depth, "prompt_tokens": int(np.mean(sizes)),
                          "accuracy": float(np.mean(hits)), "answer_logprob": float(np.mean(logps))})
    return {"lengths": list(lengths), "depths": list(depths), "trials": trials, "seed": seed, "cells": cells,
            "skipped": skipped, "read_twice": read_twice}
