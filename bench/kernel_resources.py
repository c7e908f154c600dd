"""Registers, spills and shared memory of every Triton kernel, compiled ahead of time for A100 (sm_80) and
H100 (sm_90) at every shape a shipped config runs, against the spill budget. No GPU needed.

    python bench/kernel_resources.py                  # table; exit 1 on a kernel over budget or that does not fit
    python bench/kernel_resources.py --json out.json  # the same, machine-readable (tests/kernels/test_aot.py)

Shapes: every config under configs/ (and configs/tiny/) is built on the meta device at its own precision, every
model of configs/recall/ in fp32; each mLSTM, HGRN2,
MoM and Gated DeltaNet mixer names the (head dims, chunk) its Triton op runs at. Every (op, head dims, chunk, dtype) found is
compiled with the specs its launcher uses (`aot_specs` in mixer_kernels/<op>/triton.py), then each module's
AOT_KERNELS (shown apart: fp32 at K = 256 is compiled for its shared memory, no config runs it). Budget (mixer_kernels/aot.SPILL_BUDGET): a forward kernel spills nothing, a backward kernel at most
512 bytes per thread (a spill is a round trip to local memory inside the chunk loop; a little of it in the
backward, which is bound by its dots, costs a few percent, a forward spill sits on every decoding prefill).
Shared memory and warps come from Triton's compile metadata, registers and stack (spill) bytes from the cubin.
"""

import argparse
import importlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the interpreter replaces kernels by Python functions
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mixer_kernels import aot  # noqa: E402
from mixer_kernels.delta_rule.dispatch import TRITON_CHUNK as DELTA_RULE_CHUNK  # noqa: E402
from mixer_kernels.gla.dispatch import TRITON_CHUNK as GLA_CHUNK  # noqa: E402


def triton_shapes(model: torch.nn.Module) -> set[tuple[str, int, int, int]]:
    """(Triton module, key dim, value dim, chunk) of every chunkwise op the model's mixers call."""
    from models.mixers.gated_deltanet import GatedDeltaNetMixer
    from models.mixers.hgrn2 import HGRN2Mixer
    from models.mixers.mlstm import MLSTMMixer
    from models.mixers.mom import MoMMixer

    shapes = set()
    for m in model.modules():
        if isinstance(m, MLSTMMixer):
            shapes.add(("mixer_kernels.mlstm.triton", m.qk_head_dim, m.v_head_dim, m.mlstm_cfg.chunk_size))
        elif isinstance(m, HGRN2Mixer):
            shapes.add(("mixer_kernels.gla.triton", m.head_f_dim, m.head_i_dim, m.chunk_size or GLA_CHUNK))
        elif isinstance(m, MoMMixer) and m.backend == "gated_delta_rule":
            shapes.add(("mixer_kernels.delta_rule.triton", m.head_k_dim, m.head_v_dim, m.chunk_size or DELTA_RULE_CHUNK))
        elif isinstance(m, MoMMixer):
            shapes.add(("mixer_kernels.gla.triton", m.head_k_dim, m.head_v_dim, m.chunk_size or GLA_CHUNK))
        elif isinstance(m, GatedDeltaNetMixer):
            shapes.add(("mixer_kernels.delta_rule.triton", m.head_k_dim, m.head_v_dim, m.chunk_size or DELTA_RULE_CHUNK))
    return shapes


def shipped_shapes() -> dict[tuple[str, int, int, int, str], list[str]]:
    """(module, key dim, value dim, chunk, dtype) -> the configs that run it: every run config at its precision
    and every model of the recall recipes (trained in fp32)."""
    from eval.recall_recipe import load_recipe
    from models.lm import CausalLM
    from train.config import load_config

    models = []  # (config name, ModelConfig, dtype)
    for path in sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "configs" / "tiny").glob("*.yaml")):
        cfg = load_config(path)
        models.append((str(path.relative_to(ROOT)), cfg.model, cfg.parallel.precision))
    for path in sorted((ROOT / "configs" / "recall").glob("*.yaml")):
        recipe = load_recipe(path)
        models += [(f"{path.relative_to(ROOT)}:{name}", recipe.build_model_config(name), "fp32")
                   for name in recipe.models]
    found: dict[tuple, list[str]] = {}
    for name, model_cfg, dtype in models:
        with torch.device("meta"):  # free: no weights are allocated
            model = CausalLM(model_cfg)
        for shape in triton_shapes(model):
            found.setdefault((*shape, dtype), []).append(name)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    shipped_results, shipped = [], shipped_shapes()
    for (module, k, v, chunk, dtype), configs in sorted(shipped.items()):
        print(f"{module} K={k} V={v} L={chunk} {dtype}: {', '.join(configs)}")
        specs = importlib.import_module(module).aot_specs(k, v, chunk, dtype)
        shipped_results += [aot.compile_spec(spec, module, target) for spec in specs for target in aot.TARGETS]
    key = lambda r: (r.kernel, r.target, r.dtype, r.config)  # noqa: E731
    at_shipped = {key(r) for r in shipped_results}
    unique = list({key(r): r for r in shipped_results + aot.compile_all()}.values())
    print("\nShipped shapes (spill budget applies):")
    aot.print_table([r for r in unique if key(r) in at_shipped])
    print("\nOther registered configurations (AOT_KERNELS: every dtype at the largest head sizes, for shared memory):")
    aot.print_table([r for r in unique if key(r) not in at_shipped])
    over = aot.print_over_budget([r for r in unique if key(r) in at_shipped])
    if args.json:
        args.json.write_text(json.dumps({
            "shipped": [{"module": m, "k": k, "v": v, "chunk": c, "dtype": d, "configs": cs}
                        for (m, k, v, c, d), cs in sorted(shipped.items())],
            "results": [asdict(r) | {"fits": r.fits, "shipped_shape": key(r) in at_shipped,
                                     "over_budget": key(r) in at_shipped and aot.over_budget(r)} for r in unique],
        }, indent=1))
    return 0 if all(r.fits for r in unique) and not over else 1


if __name__ == "__main__":
    sys.exit(main())
