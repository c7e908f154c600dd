"""Bytes each rank sends in the DeepSpeed-Ulysses all-to-alls of one layer, measured against the analytic volume.

    python bench/ulysses_comm.py

For sequence length T and SP size in {1, 2, 4}, one attention mixer wrapped by train/sequence_parallel.py
(which hands it to DeepSpeed's DistributedAttention) runs forward and backward on one rank's T / SP tokens. The all-to-all is simulated in this one process (same
shapes, data kept in place) and every call records the bytes that leave the rank: (SP - 1) / SP of its
input. Analytic (DeepSpeed-Ulysses): per layer, q, k, v and the output go through one all-to-all each in
the forward, and their gradients once each in the backward, so a rank sends
2 * (2 * H + 2 * H_kv) * head_dim * (T / SP) * B * bytes * (SP - 1) / SP. With T and SP growing together
that stays constant up to the (SP - 1) / SP factor, which is the point of Ulysses.
"""

import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from deepspeed.sequence import layer as ds_layer  # noqa: E402

from models import ModelConfig  # noqa: E402
from models.mixers.attention import AttentionMixer  # noqa: E402
from train import sequence_parallel  # noqa: E402

CFG = ModelConfig(vocab_size=256, d_model=256, n_layers=1, n_heads=8, attention={"n_kv_heads": 4})
BATCH = 1


class SimulatedGroup:
    """Stands in for torch.distributed / deepspeed.comm on a group of `size` ranks, seen from rank 0:
    all-to-all keeps the data in place and counts the bytes that leave the rank."""

    def __init__(self, size: int):
        self.size, self.bytes_sent = size, 0

    def get_world_size(self, group=None) -> int:
        return self.size

    def get_rank(self, group=None) -> int:
        return 0

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor, group=None, async_op=False) -> None:
        self.bytes_sent += input.numel() * input.element_size() * (self.size - 1) // self.size
        output.copy_(input)


def measured_bytes(seq_len: int, sp: int) -> int:
    mixer = AttentionMixer(CFG, 0)
    x = torch.randn(BATCH, seq_len // sp, CFG.d_model, requires_grad=True)
    if sp == 1:  # no wrapper, no communication
        mixer(x)[0].sum().backward()
        return 0
    group = SimulatedGroup(sp)
    # Our wrapper's collectives and those of DeepSpeed's DistributedAttention, which the attention mixer uses.
    with mock.patch.object(sequence_parallel, "dist", group), mock.patch.object(ds_layer, "dist", group):
        # apply_sequence_parallel walks model.blocks[i].mixer; here the model is one mixer.
        sequence_parallel.apply_sequence_parallel(SimpleNamespace(blocks=[SimpleNamespace(mixer=mixer)]), group)
        mixer(x)[0].sum().backward()
    return group.bytes_sent


def analytic_bytes(seq_len: int, sp: int) -> int:
    heads, kv = CFG.n_heads, CFG.attention.n_kv_heads
    per_token = (2 * heads + 2 * kv) * CFG.head_dim * 4  # q, output and k, v; fp32
    return 2 * per_token * (seq_len // sp) * BATCH * (sp - 1) // sp  # forward + backward


def main() -> None:
    print(f"{'T':>6} {'SP':>3} {'measured bytes':>15} {'analytic bytes':>15} {'equal':>6}")
    for seq_len, sp in [(1024, 1), (1024, 2), (1024, 4), (2048, 2), (4096, 4), (8192, 4)]:
        got, want = measured_bytes(seq_len, sp), analytic_bytes(seq_len, sp)
        print(f"{seq_len:>6} {sp:>3} {got:>15,} {want:>15,} {str(got == want):>6}")
    print("Per rank the volume is proportional to (T / SP) * (SP - 1) / SP: with T / SP fixed it stays constant "
          "up to the (SP - 1) / SP factor (0.5 at SP=2, 0.75 at SP=4, -> 1), as the Ulysses paper's O(N / P).")


if __name__ == "__main__":
    main()
