"""CPU training throughput of our Mamba and Mamba-2 against transformers' PyTorch fallbacks; length scaling.

Same shape (configs/tiny/mamba.yaml, configs/tiny/mamba2.yaml at width 256, Mamba-2 with the real configs'
heads of 64 channels and chunks of 256) and the same weights on both sides; one training step is forward + backward of the next-token loss (no optimizer step). For each family:

- tokens/s at T=512 of ours and of transformers' `MambaForCausalLM` / `Mamba2ForCausalLM` on the CPU
  (their `slow_forward` / `torch_forward`), and the ratio, for the whole model and for the sequence-mixing
  core alone (causal conv + scan, the part the two sides implement differently);
- our time per token at T=4096 over T=512 at equal tokens per step (1.0 is linear in the length).

Timings are medians of interleaved repeats, so a burst of machine noise hits both sides alike, on one
thread by default: on a small shared machine extra intra-op threads mostly add noise (spinning threads
slow down badly when other jobs hold the cores). Run: `python bench/ssm_cpu.py [--threads N]` (1-2 minutes
on an idle 2-core machine).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import transformers  # noqa: E402
from transformers.models.mamba import modeling_mamba  # noqa: E402
from transformers.models.mamba2 import modeling_mamba2  # noqa: E402

from mixer_kernels.causal_conv1d import causal_conv1d  # noqa: E402
from mixer_kernels.selective_scan import selective_scan  # noqa: E402
from mixer_kernels.ssd import ssd  # noqa: E402
from models import CausalLM, ModelConfig  # noqa: E402
from models.hf import mamba as hf_mamba  # noqa: E402
from models.hf import mamba2 as hf_mamba2  # noqa: E402

transformers.logging.set_verbosity_error()
WIDTH, VOCAB = 256, 2048


def median_seconds(steps: dict, repeats: int, warm_up: bool = True) -> dict[str, float]:
    """Median wall time of each named zero-argument step, run interleaved (after one warm-up each)."""
    for step in steps.values() if warm_up else ():
        step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


# Mamba-2 with the real configs' head shape (headdim 64, chunks of 256) at this width, d_state halved.
SHAPES = {"mamba": {}, "mamba2": {"mamba2": {"headdim": 64, "d_state": 64, "chunk_size": 256}}}


def models(family: str, hf_module, hf_class) -> tuple[CausalLM, torch.nn.Module]:
    raw = yaml.safe_load((ROOT / "configs" / "tiny" / f"{family}.yaml").read_text())["model"]
    torch.manual_seed(0)
    ours = CausalLM(ModelConfig(**{**raw, "d_model": WIDTH, "n_heads": 1, **SHAPES[family]})).train()
    theirs = hf_class(hf_module.to_hf_config(ours.cfg)).train()
    theirs.load_state_dict(hf_module.to_hf_state_dict(ours.state_dict(), ours.cfg), strict=False)
    return ours, theirs


def model_steps(ours, theirs, batch: int, length: int) -> dict:
    ids = torch.randint(0, VOCAB, (batch, length))

    def hf_step():
        logits = theirs(ids, use_cache=False).logits
        F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()

    return {"ours": lambda: ours(ids, labels=ids).loss.backward(), "transformers": hf_step}


def core_steps_mamba(mixer, batch: int, length: int) -> dict:
    """Conv + selective scan of one layer, ours (mixer_kernels/) against transformers' fallback functions."""
    n = mixer.cfg.d_state
    g = torch.Generator().manual_seed(0)
    u, z, dt = (torch.randn(batch, mixer.d_inner, length, generator=g, requires_grad=True) for _ in range(3))
    B, C = (torch.randn(batch, n, length, generator=g, requires_grad=True) for _ in range(2))
    w, b = mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias

    def ours():
        x, _ = causal_conv1d(u, w, b, activation="silu")
        y, _ = selective_scan(x, dt, mixer.A, B, C, mixer.D.float(), z, mixer.dt_proj.bias.float(), True)
        y.sum().backward()

    def theirs():
        x = modeling_mamba.causal_conv1d_fn(u, w, b, activation="silu")
        y = modeling_mamba.mamba_selective_scan(x, dt, mixer.A, B, C, D=mixer.D.float(), z=z,
                                                delta_bias=mixer.dt_proj.bias.float(), delta_softplus=True)
        y.sum().backward()

    return {"ours": ours, "transformers": theirs}


def core_steps_mamba2(mixer, batch: int, length: int) -> dict:
    """Conv + SSD of one layer, ours (mixer_kernels/) against transformers' fallback functions."""
    m, h = mixer.cfg, mixer.n_heads
    g = torch.Generator().manual_seed(0)
    xbc = torch.randn(batch, mixer.conv1d.in_channels, length, generator=g, requires_grad=True)
    dt = torch.randn(batch, length, h, generator=g, requires_grad=True)
    w, b = mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias

    def split(x):  # (B, C, T) -> x (B, T, H, P), B, C (B, T, G, N)
        x, B, C = x.transpose(1, 2).split([mixer.d_inner, mixer.bc_dim, mixer.bc_dim], dim=-1)
        groups = (m.n_groups, -1)
        return x.unflatten(-1, (h, m.headdim)), B.unflatten(-1, groups), C.unflatten(-1, groups)

    def ours():
        x, B, C = split(causal_conv1d(xbc, w, b, activation="silu")[0])
        y, _ = ssd(x, dt, mixer.A, B, C, m.chunk_size, D=mixer.D, dt_bias=mixer.dt_bias, dt_softplus=True)
        y.sum().backward()

    def theirs():
        x, B, C = split(modeling_mamba2.causal_conv1d_fn(xbc, w, b, activation="silu"))
        y = modeling_mamba2.mamba2_chunk_scan(
            x, dt, mixer.A, B, C, m.chunk_size, D=mixer.D, dt_bias=mixer.dt_bias, dt_softplus=True
        )
        y.sum().backward()

    return {"ours": ours, "transformers": theirs}


def report(label: str, seconds: dict[str, float], tokens: int) -> None:
    ours, theirs = seconds["ours"], seconds["transformers"]
    print(f"  {label:<34} ours {tokens / ours:9.0f} tok/s   transformers {tokens / theirs:9.0f} tok/s   "
          f"ours / transformers {theirs / ours:5.2f}x  (goal >= 1.5)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    torch.set_num_threads(parser.parse_args().threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), width {WIDTH}")
    # transformers' Mamba-1 fallback loops over time under autograd, seconds per step: fewer tokens, one
    # timed run each (its own overheads dwarf any warm-up effect).
    families = (
        ("mamba", hf_mamba, transformers.MambaForCausalLM, core_steps_mamba, (1, 256), 1),
        ("mamba2", hf_mamba2, transformers.Mamba2ForCausalLM, core_steps_mamba2, (8, 512), 3),
    )
    for family, hf_module, hf_class, core_steps, (batch, length), repeats in families:
        ours, theirs = models(family, hf_module, hf_class)
        mixer = ours.blocks[0].mixer
        print(f"{family}: {sum(p.numel() for p in ours.parameters()) / 1e6:.2f}M parameters, "
              f"{ours.cfg.n_layers} layers; batch {batch} x T={length} against transformers")
        for label, steps in (("whole model, training step", model_steps(ours, theirs, batch, length)),
                             ("conv + scan of one layer, fwd+bwd", core_steps(mixer, batch, length))):
            report(label, median_seconds(steps, repeats, warm_up=repeats > 1), batch * length)
        # Equal tokens per step (8 x 512 = 1 x 4096), so only the sequence length differs.
        steps = {"T=512": model_steps(ours, theirs, 8, 512)["ours"],
                 "T=4096": model_steps(ours, theirs, 1, 4096)["ours"]}
        seconds = median_seconds(steps, 3)
        print(f"  ours, time per token at T=4096 over T=512 (batch 1 vs 8): "
              f"{seconds['T=4096'] / seconds['T=512']:.2f}  (goal <= 1.3)")


if __name__ == "__main__":
    main()
