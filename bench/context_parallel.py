"""Bytes each rank sends per layer under Ulysses (SP) and under context parallelism's state passing (CP), analytic
and measured through the real collectives; and the compute overhead of state passing at tiny size.

    python bench/context_parallel.py [--quick]

Shapes: one mixer layer of xLSTM-7B, Mamba-2 2.7B and HGRN2 1.3B (configs/*.yaml), batch 1, fp32 exchanges.
Measured: the mixer runs forward and backward through train/sequence_parallel.py or train/context_parallel.py
with torch.distributed replaced by a simulated group seen from one rank (data kept in place, every collective
records the bytes that leave the rank: (n - 1) x its input for an all-gather, (n - 1) / n for an all-to-all).
Analytic:
- Ulysses: every projection the mixer sends to the head split and its output, forward and backward:
  2 x (projected widths + output width) x (T / SP) x 4 bytes x (SP - 1) / SP. Grows with T.
- State passing: one all-gather of the layer's recurrent state (for CP > 2 also its transition and the short
  convolutions' halo of d_conv - 1 tokens) and, in the backward, one all-to-all of its gradient:
  2 x (CP - 1) x 4 bytes x (state [+ transition + halo] numbers). Independent of T.
Ulysses is measured at T = 8192 (linear in T by construction, checked against the formula); state passing at a
piece of 64 tokens, since its exchange never depends on T. Mamba-2 2.7B has n_groups = 1: Ulysses cannot split
it at all.
"""

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.registry import build_mixer  # noqa: E402
from train import context_parallel, sequence_parallel  # noqa: E402
from train.config import load_config  # noqa: E402
from train.context_parallel import flatten_state  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"xLSTM-7B": ("", "xlstm_7b"), "Mamba-2 2.7B": ("", "mamba2_2.7b"), "HGRN2 1.3B": ("", "hgrn2_1.3b")}
LENGTHS = [8192, 32768, 131072, 1048576]
BYTES = 4  # fp32


class SimulatedGroup:
    """torch.distributed on a group of `size` ranks, seen from rank `rank`: data stays in place, bytes counted."""

    def __init__(self, size: int, rank: int):
        self.size, self.rank, self.bytes_sent = size, rank, 0

    def get_world_size(self, group=None) -> int:
        return self.size

    def get_rank(self, group=None) -> int:
        return self.rank

    def all_gather(self, outputs: list[torch.Tensor], x: torch.Tensor, group=None) -> None:
        self.bytes_sent += (self.size - 1) * x.numel() * x.element_size()
        for out in outputs:
            out.copy_(x)

    def all_to_all_single(self, output: torch.Tensor, x: torch.Tensor, group=None, async_op=False) -> None:
        self.bytes_sent += x.numel() * x.element_size() * (self.size - 1) // self.size
        output.copy_(x)


def mixer_of(folder: str, config: str):
    cfg = load_config(ROOT / "configs" / folder / f"{config}.yaml").model
    torch.manual_seed(0)
    mixer = build_mixer(cfg.layer_mixers()[0], cfg, 0)
    if hasattr(mixer, "init_weights"):
        mixer.init_weights()
    return mixer, cfg


def wrap(mixer, apply, group):
    """Runs apply_sequence_parallel / apply_context_parallel on a one-mixer model."""
    block = torch.nn.Module()
    block.mixer = mixer
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([block])
    apply(model, group)


def measured(mixer, d_model: int, tokens: int, group: SimulatedGroup, apply) -> int:
    x = torch.randn(1, tokens, d_model, requires_grad=True)
    with mock.patch.object(sequence_parallel, "dist", group), mock.patch.object(context_parallel, "dist", group):
        wrap(mixer, apply, group)
        mixer(x)[0].sum().backward()
    return group.bytes_sent


def state_numbers(mixer, cp: int, tokens: int, d_model: int) -> int:
    """The numbers one state-passing exchange of this layer carries per rank (batch 1)."""
    x = torch.randn(1, tokens, d_model)
    n = sum(t.numel() for t in flatten_state(mixer.init_state(1)))
    if cp > 2:
        # What the exchange runs on: the projections of the heads (`cp_core`), or the mixer's input.
        inputs = mixer.project(x) if hasattr(mixer, "cp_core") else [x]
        tail = [t[:, -mixer.cp_halo_tokens:] for t in inputs] if mixer.cp_halo_tokens else None
        n += sum(t.numel() for t in mixer.cp_transition(inputs if hasattr(mixer, "cp_core") else x,
                                                         tail if tail is None or len(inputs) > 1 else tail[0]))
        n += sum(t.numel() for t in tail or [])  # the halo's own all-gather
    return n


def analytic_cp(numbers: int, cp: int) -> int:
    return 2 * (cp - 1) * BYTES * numbers


def analytic_sp(mixer, seq_len: int, sp: int, d_model: int) -> int | None:
    """None where Ulysses cannot split the layer over sp ranks."""
    if any(count % sp for count in mixer.sp_head_counts().values()):
        return None
    x = torch.randn(1, 2, d_model)
    with torch.no_grad():
        widths = sum(t[0, 0].numel() for t in mixer.project(x))
        out = mixer.mix(*mixer.project(x)).shape  # (1, 2, H, DV)
    widths += out[2:].numel()
    return 2 * widths * (seq_len // sp) * BYTES * (sp - 1) // sp


def overhead(repeats: int) -> list[tuple[str, float, float]]:
    """Tiny size, CP=4: forward + backward time of the first and of a middle rank on its 64-token piece, over a
    quarter of the unsplit mixer's time on the whole 256 tokens (interleaved repeats, medians)."""
    rows = []
    for family in ("xlstm", "mamba2", "hgrn2"):
        cfg = load_config(ROOT / "configs" / "tiny" / f"{family}.yaml").model
        whole = torch.randn(4, 256, cfg.d_model, requires_grad=True)
        piece = whole.detach()[:, :64].clone().requires_grad_()
        times = {"unsplit": [], "first": [], "middle": []}
        for _ in range(repeats):
            for kind in times:
                torch.manual_seed(0)
                mixer = build_mixer(cfg.layer_mixers()[0], cfg, 0)
                group = SimulatedGroup(4, 0 if kind == "first" else 1)
                with mock.patch.object(sequence_parallel, "dist", group), \
                        mock.patch.object(context_parallel, "dist", group):
                    if kind != "unsplit":
                        wrap(mixer, context_parallel.apply_context_parallel, group)
                    start = time.perf_counter()
                    mixer(whole if kind == "unsplit" else piece)[0].sum().backward()
                    times[kind].append(time.perf_counter() - start)
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        rows.append((family, 4 * med["first"] / med["unsplit"], 4 * med["middle"] / med["unsplit"]))
    return rows


def largest_sp(mixer, d_model: int) -> int | None:
    return next((s for s in (8, 4, 2) if analytic_sp(mixer, 8192, s, d_model) is not None), None)


def byte_checks(shapes: dict = SHAPES) -> list[tuple[str, str, int, int]]:
    """(layer, what, measured bytes, analytic bytes) for Ulysses at T = 8192 and state passing at CP = 2 and 8."""
    checks = []
    for shape, where in shapes.items():
        mixer, cfg = mixer_of(*where)
        d, sp = cfg.d_model, largest_sp(mixer, cfg.d_model)
        if sp is not None:
            got = measured(mixer_of(*where)[0], d, 8192 // sp, SimulatedGroup(sp, 0),
                           sequence_parallel.apply_sequence_parallel)
            checks.append((shape, f"Ulysses SP={sp} T=8192", got, analytic_sp(mixer, 8192, sp, d)))
        for cp in (2, 8):
            got = measured(mixer_of(*where)[0], d, 64, SimulatedGroup(cp, 1), context_parallel.apply_context_parallel)
            checks.append((shape, f"state passing CP={cp}", got, analytic_cp(state_numbers(mixer, cp, 64, d), cp)))
    return checks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer timing repeats")
    args = parser.parse_args()
    print("Bytes sent per rank per layer (batch 1, fp32). SP: Ulysses at its largest size <= 8 the heads allow; "
          "CP: state passing.")
    print(f"{'layer':<13} {'T':>8} {'SP':>3} {'Ulysses bytes':>15} {'CP':>3} {'state-passing bytes':>20}")
    for shape, where in SHAPES.items():
        mixer, cfg = mixer_of(*where)
        d, sp = cfg.d_model, largest_sp(mixer, cfg.d_model)
        cp_bytes = analytic_cp(state_numbers(mixer, 8, 64, d), 8)
        for t in LENGTHS:
            sp_bytes = "n/a (heads)" if sp is None else f"{analytic_sp(mixer, t, sp, d):,}"
            print(f"{shape:<13} {t:>8} {sp or '-':>3} {sp_bytes:>15} {8:>3} {cp_bytes:>20,}")
    print("\nMeasured through the real collectives vs analytic:")
    for shape, what, got, want in byte_checks():
        print(f"  {shape:<13} {what:<24} measured {got:>14,}  analytic {want:>14,}  equal {got == want}")
    print("\nState-passing compute at tiny size, CP=4: one rank's forward + backward on its 64 of 256 tokens over a "
          "quarter of the unsplit mixer's on all 256 (1.0 = no overhead):")
    for family, first, middle in overhead(3 if args.quick else 7):
        print(f"  {family:<8} first rank {first:.2f}x   middle rank {middle:.2f}x   (the first rank runs its piece "
              "once; a middle rank twice, plus its transition: expected about 1x and 2x)")


if __name__ == "__main__":
    main()
