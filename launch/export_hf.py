"""Export a training checkpoint to a Hugging Face folder that `AutoModelForCausalLM.from_pretrained` loads.

    python launch/export_hf.py --checkpoint runs/tiny-xlstm/checkpoints/step_00000200 --out exports/tiny-xlstm
    python launch/export_hf.py --checkpoint runs/tiny-xlstm --out exports/tiny-xlstm   # newest complete one

ZeRO shards are consolidated to fp32 first. The tokenizer of the run's shards is copied beside the weights.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from models import CausalLM, ModelConfig  # noqa: E402
from models.hf.export import export_hf  # noqa: E402
from train.checkpoint import CheckpointError, complete_checkpoints, consolidated_state_dict  # noqa: E402


def find_checkpoint(path: Path) -> Path:
    """A step_* folder as given, or the newest complete one under a run folder or its checkpoints/."""
    for root in (path, path / "checkpoints"):
        found = complete_checkpoints(root)
        if found:
            return found[-1]
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="step_* folder, or a run folder")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer.json to ship (default: the one of the run's data shards)")
    args = parser.parse_args()
    try:
        ckpt = find_checkpoint(args.checkpoint)
        model_config, state = consolidated_state_dict(ckpt)
        model = CausalLM(ModelConfig(**model_config))
        model.load_state_dict(state)
        tokenizer = args.tokenizer or run_tokenizer(ckpt)
        export_hf(model, args.out, tokenizer_file=str(tokenizer) if tokenizer else None)
    except (CheckpointError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported {ckpt} -> {args.out}")
    return 0


def run_tokenizer(ckpt: Path) -> Path | None:
    """The tokenizer.json of the data the run trained on, found through the run's resolved config."""
    config = ckpt.parent.parent / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())["data"]
    candidate = Path(data["tokenizer"]) if data.get("tokenizer") else Path(data["shards_dir"]) / "tokenizer.json"
    return candidate if candidate.is_file() else None


if __name__ == "__main__":
    sys.exit(main())
