"""Multi-query associative recall (MQAR, Arora et al. 2023, "Zoology"): the example generator and its accuracy.

What is generated, per example (Zoology's `multiquery_ar`, zoology/data/associative_recall.py):

- Vocabulary split in two: keys are drawn from [1, V/2), values from [V/2, V). Each example draws
  `num_kv_pairs` distinct keys and `num_kv_pairs` distinct values, both without replacement, and pairs
  them in draw order.
- The sequence opens with the pairs laid out as k1 v1 k2 v2 ... (the context, 2 * num_kv_pairs tokens).
- The rest (seq_len - context tokens) is cut into `space = (seq_len - context) / 2` two-token slots. Each
  key is queried exactly once: key j goes into slot g_j, at position context + 2 * g_j. The slots are
  drawn without replacement with probabilities p(g) proportional to (g + 1) ** (power_a - 1) for
  g = 0 .. space - 1 (Zoology's `power_a * arange(1, space + 1) ** (power_a - 1)`, normalised; power_a
  = 0.01 makes a query 2 slots after the context about space-times likelier than one at the end).
  Sampling is successive (numpy's `choice(replace=False, p=p)`, as Zoology), so the slot of the FIRST
  pair's query follows p exactly; later pairs take the renormalised rest.
- Every other position holds filler: with `random_non_queries` (Zoology's default) a token drawn
  uniformly from the whole vocabulary [0, V), else 0.
- Labels are -100 everywhere except at each query position, whose label is the value paired with the
  queried key: the model must emit the value right after reading the key again. Only those positions
  are trained on and scored.
- `read_twice` (JRT-Prompt, Arora et al. 2024, "Just read twice"): the context k1 v1 ... is given twice
  before the queries, so an example is seq_len + 2 * num_kv_pairs tokens; the query region is unchanged.

Zoology seeds numpy's global RNG; here a `numpy.random.Generator` is passed in, so generation has no
global side effects (the same distribution, not the same numbers as Zoology for a given seed).
Accuracy (Zoology's metric) is the fraction of labelled positions whose argmax equals the label.
"""

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class MQARSetting:
    """One MQAR configuration: the grid point accuracies are reported for."""

    vocab_size: int
    seq_len: int
    num_kv_pairs: int
    power_a: float = 0.01
    random_non_queries: bool = True
    read_twice: bool = False

    def __post_init__(self):
        # Zoology's own preconditions: room for every query after the context, and keys/values that can
        # be drawn without replacement from their halves of the vocabulary.
        if self.seq_len % 2:
            raise ValueError(f"MQAR seq_len={self.seq_len} must be even")
        if self.num_kv_pairs * 4 > self.seq_len:
            raise ValueError(f"MQAR needs seq_len >= 4 * num_kv_pairs; got seq_len={self.seq_len}, "
                             f"num_kv_pairs={self.num_kv_pairs}")
        if self.vocab_size <= self.seq_len:
            raise ValueError(f"MQAR needs vocab_size > seq_len (Zoology's assertion); got {self.vocab_size}")
        if self.num_kv_pairs >= self.vocab_size // 2:
            raise ValueError(f"MQAR: {self.num_kv_pairs} distinct keys do not fit in [1, {self.vocab_size // 2})")

    @property
    def context_len(self) -> int:
        return 2 * self.num_kv_pairs

    @property
    def num_slots(self) -> int:
        return (self.seq_len - self.context_len) // 2

    def slot_probabilities(self) -> np.ndarray:
        """p(g) for query slot g = 0 .. num_slots - 1 (the power law of Zoology)."""
        p = self.power_a * np.arange(1, self.num_slots + 1) ** (self.power_a - 1)
        return p / p.sum()

    @property
    def name(self) -> str:
        return f"T{self.seq_len}_kv{self.num_kv_pairs}" + ("_jrt" if self.read_twice else "")

    @property
    def input_len(self) -> int:
        """Tokens per example: seq_len, plus the repeated context under read_twice."""
        return self.seq_len + (self.context_len if self.read_twice else 0)


@dataclass
class MQARBatch:
    inputs: torch.Tensor  # (N, T) token ids
    labels: torch.Tensor  # (N, T) the value at each query position, -100 elsewhere
    keys: np.ndarray  # (N, K) key of pair j
    values: np.ndarray  # (N, K) value of pair j
    slots: np.ndarray  # (N, K) query slot of pair j: query at context_len + 2 * slot (+ context_len if read twice)


def generate_mqar(setting: MQARSetting, num_examples: int, rng: np.random.Generator) -> MQARBatch:
    """`num_examples` MQAR sequences of `setting`, drawn from `rng` (see the module docstring)."""
    s = setting
    k, half = s.num_kv_pairs, s.vocab_size // 2
    p = s.slot_probabilities()
    keys = np.stack([rng.choice(np.arange(1, half), size=k, replace=False) for _ in range(num_examples)])
    values = np.stack([rng.choice(np.arange(half, s.vocab_size), size=k, replace=False)
                       for _ in range(num_examples)])
    slots = np.stack([rng.choice(s.num_slots, size=k, replace=False, p=p) for _ in range(num_examples)])

    seq = np.zeros((num_examples, s.seq_len), dtype=np.int64)
    seq[:, 0:s.context_len:2] = keys
    seq[:, 1:s.context_len:2] = values
    query_pos = s.context_len + 2 * slots  # (N, K)
    np.put_along_axis(seq, query_pos, keys, axis=1)
    labels = np.full_like(seq, -100)
    np.put_along_axis(labels, query_pos, values, axis=1)
    if s.random_non_queries:
        filler = np.ones_like(seq, dtype=bool)
        filler[:, : s.context_len] = False
        np.put_along_axis(filler, query_pos, False, axis=1)
        seq[filler] = rng.integers(0, s.vocab_size, size=int(filler.sum()))
    if s.read_twice:  # the context again, right after itself; slots still count from the query region
        seq = np.concatenate([seq[:, : s.context_len], seq], axis=1)
        labels = np.concatenate([np.full((num_examples, s.context_len), -100), labels], axis=1)
    return MQARBatch(torch.from_numpy(seq), torch.from_numpy(labels), keys, values, slots)


@torch.no_grad()
def mqar_accuracy(model, batch: MQARBatch, batch_size: int = 256) -> float:
    """Fraction of query positions where the model's argmax is the stored value (Zoology's accuracy)."""
    device = next(model.parameters()).device
    correct = total = 0
    for i in range(0, len(batch.inputs), batch_size):
        ids = batch.inputs[i:i + batch_size].to(device)
        labels = batch.labels[i:i + batch_size].to(device)
        pred = model(ids).logits.argmax(-1)
        mask = labels != -100
        correct += (pred[mask] == labels[mask]).sum().item()
        total += mask.sum().item()
    return correct / max(total, 1)
