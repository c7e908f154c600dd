"""Evaluate a checkpoint: held-out perplexity, perplexity by context length, passkey, MQAR, lm-eval tasks.

    python launch/evaluate.py --checkpoint runs/tiny-xlstm --suite ppl,ppl_by_length,passkey --out runs/eval/x
    python launch/evaluate.py --checkpoint exports/tiny-xlstm --suite lm_eval --tasks hellaswag,swde --limit 100
    python launch/evaluate.py --suite mqar --recipe configs/recall/mqar.yaml --out runs/eval/mqar  # all families

--checkpoint takes a run folder (its newest complete checkpoint), a step_* folder (ZeRO shards are
consolidated to fp32 in this process) or an exported Hugging Face folder. One process on one device
(cuda when available, else cpu); evaluation is not distributed: at the sizes this stack evaluates, one
GPU holds the model, and lm-eval's own data parallelism (accelerate) can be layered on later.
Writes results.json, summary.md and PNG plots to --out, and logs the metrics to wandb (offline).
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

import torch  # noqa: E402

from data import DataError  # noqa: E402
from launch.export_hf import find_checkpoint  # noqa: E402
from mixer_kernels.backend import KernelFallbackError, KernelSettingsError  # noqa: E402
from models import CausalLM, ModelConfig  # noqa: E402
from train.checkpoint import CheckpointError, consolidated_state_dict  # noqa: E402
from train.kernel_report import check_kernels, kernel_report  # noqa: E402
from train.logs import configure_logging  # noqa: E402

SUITES = ("ppl", "ppl_by_length", "passkey", "mqar", "lm_eval")


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(
        (path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json"))


def load_model(path: Path) -> tuple[CausalLM, dict]:
    """The model of an HF folder, run folder or step folder, and what is known about its run."""
    if is_hf_folder(path):
        from models.hf.export import load_hf

        tokenizer = path / "tokenizer.json"
        return load_hf(path), {"kind": "hf", "checkpoint": str(path), "run_config": None,
                               "tokenizer": str(path) if tokenizer.is_file() else None}
    ckpt = find_checkpoint(path)
    model_config, state = consolidated_state_dict(ckpt)
    model = CausalLM(ModelConfig(**model_config))
    model.load_state_dict(state)
    run_config_file = ckpt.parent.parent / "config.json"
    run_config = json.loads(run_config_file.read_text()) if run_config_file.is_file() else None
    return model, {"kind": "deepspeed", "checkpoint": str(ckpt), "run_config": run_config, "tokenizer": None}


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="run folder, step_* folder or exported HF folder")
    p.add_argument("--suite", default="ppl,ppl_by_length,passkey", help=f"comma list of {','.join(SUITES)}")
    p.add_argument("--out", type=Path, help="output folder (default: <checkpoint>/eval)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="default: bfloat16 on cuda (flash-attn takes half precision only), float32 on cpu")
    p.add_argument("--shards", type=Path, help="shards folder with the held-out split (default: the run's)")
    p.add_argument("--split", default="val", help="held-out split name")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json or HF folder (default: the run's / export's)")
    p.add_argument("--seq-len", type=int, help="training length (default: the run's data.seq_len)")
    p.add_argument("--lengths", type=_ints, help="context lengths (default: seq_len x 1/4, 1/2, 1, 2, 4)")
    p.add_argument("--max-tokens", type=int, default=32768, help="tokens scored per context length")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chunk-size", type=int, help="feed long sequences in chunks of this many tokens")
    p.add_argument("--passkey-lengths", type=_ints, help="prompt lengths (default: seq_len x 1/2, 1, 2, 4)")
    p.add_argument("--passkey-depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--passkey-trials", type=int, default=5)
    p.add_argument("--recipe", type=Path, default=Path(__file__).resolve().parents[1] / "configs/recall/mqar.yaml")
    p.add_argument("--recipe-set", action="append", default=[], metavar="KEY=VALUE", help="e.g. train.steps=300")
    p.add_argument("--models", help="MQAR recipe models to train (default: all)")
    p.add_argument("--tasks", help="lm-eval task names, comma separated")
    p.add_argument("--task-dir", help="folder of local lm-eval task YAMLs")
    p.add_argument("--limit", type=float, help="lm-eval: examples per task (or fraction)")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--read-twice", action="store_true", help="JRT-Prompt: lm-eval tasks read every "
                   "context twice; passkey and MQAR fine-tuning add a read-twice run beside the plain one")
    p.add_argument("--wandb", default="offline", choices=["offline", "online", "disabled"])
    p.add_argument("--wandb-project", default="hybrid-eval")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.suites = [s for s in args.suite.split(",") if s]
    unknown = sorted(set(args.suites) - set(SUITES))
    if unknown:
        p.error(f"unknown suite(s) {unknown}; choose from {','.join(SUITES)}")
    if args.checkpoint is None and args.suites != ["mqar"]:
        p.error("--checkpoint is required (only --suite mqar alone trains the recipe's own models)")
    if "lm_eval" in args.suites and not args.tasks:
        p.error("--suite lm_eval needs --tasks")
    return args


def evaluate(args: argparse.Namespace) -> dict:
    """Runs the suites; returns the results dict (see eval/report.py for its layout)."""
    from eval.report import log_wandb, write_report

    results: dict = {"meta": {"suites": args.suites, "device": args.device, "timings_s": {}}}
    timings = results["meta"]["timings_s"]
    model, info = (None, {}) if args.checkpoint is None else load_model(args.checkpoint)
    seq_len = shards = tokenizer = None
    if model is not None:
        model = model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
        # Which path each kernel op takes on this device; under kernels.strict (HP_KERNELS) a fallback stops here.
        check_kernels(kernel_report(model.kernel_ops(), torch.device(args.device), getattr(torch, args.dtype)))
        run = info["run_config"] or {}
        data = run.get("data", {})
        seq_len = args.seq_len or data.get("seq_len") or model.cfg.max_seq_len
        shards = args.shards or (Path(data["shards_dir"]) if data.get("shards_dir") else None)
        tokenizer = args.tokenizer or info["tokenizer"] or (shards / "tokenizer.json" if shards else None)
        results["meta"] |= {"checkpoint": info["checkpoint"], "kind": info["kind"], "seq_len": seq_len,
                            "shards": str(shards) if shards else None, "model": model.cfg.model_dump(mode="json")}

    def timed(name, fn):
        start = time.perf_counter()
        results[name] = fn()
        timings[name] = round(time.perf_counter() - start, 2)
        print(f"{name}: done in {timings[name]} s", flush=True)

    if {"ppl", "ppl_by_length"} & set(args.suites):
        from eval.perplexity import heldout_stream, perplexity, perplexity_by_length

        if shards is None:
            raise ValueError("perplexity needs held-out shards: pass --shards (the run config names none)")
        stream = heldout_stream(shards, args.split)
        kw = {"max_tokens": args.max_tokens, "batch_size": args.batch_size, "chunk_size": args.chunk_size}
        if "ppl" in args.suites:
            timed("ppl", lambda: perplexity(model, stream, seq_len, **kw))
        if "ppl_by_length" in args.suites:
            lengths = args.lengths or [max(1, seq_len // 4), max(1, seq_len // 2), seq_len, 2 * seq_len, 4 * seq_len]
            timed("ppl_by_length", lambda: perplexity_by_length(model, stream, lengths, **kw))
    if "passkey" in args.suites:
        from tokenizers import Tokenizer

        from eval.passkey import passkey_grid

        if tokenizer is None:
            raise ValueError("passkey needs a tokenizer: pass --tokenizer")
        path = Path(tokenizer)
        tok = Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
        lengths = args.passkey_lengths or [seq_len // 2, seq_len, 2 * seq_len, 4 * seq_len]  # too short: skipped
        for key, twice in (("passkey", False), ("passkey_read_twice", True))[: 1 + args.read_twice]:
            timed(key, lambda twice=twice: passkey_grid(model, lambda s: tok.encode(s).ids, lengths,
                                                       args.passkey_depths, args.passkey_trials,
                                                       chunk_size=args.chunk_size, read_twice=twice))
    if "mqar" in args.suites:
        import yaml

        from eval.recall_recipe import finetune_checkpoint, load_recipe, run_recipe

        overrides = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.recipe_set)}
        recipe = load_recipe(args.recipe, overrides)
        if model is None:
            only = args.models.split(",") if args.models else None
            timed("mqar", lambda: run_recipe(recipe, only=only, device=args.device))
        else:
            timed("mqar", lambda: finetune_checkpoint(model, recipe, read_twice=args.read_twice))
    if "lm_eval" in args.suites:
        from eval.lm_eval_adapter import HybridLM, hf_tokenizer, run_lm_eval, task_metrics

        if tokenizer is None:
            raise ValueError("lm_eval needs a tokenizer: pass --tokenizer")
        eos = None
        if shards is not None and (Path(shards) / "manifest.json").is_file():
            from data import read_manifest

            eos = read_manifest(shards).eos_token
        lm = HybridLM(model=model, tokenizer=hf_tokenizer(tokenizer, eos), batch_size=args.batch_size,
                      device=args.device, read_twice=args.read_twice, prefill_chunk=args.chunk_size)
        limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
        timed("lm_eval", lambda: task_metrics(run_lm_eval(lm, args.tasks.split(","), task_dir=args.task_dir,
                                                          limit=limit, num_fewshot=args.num_fewshot)))

    out = args.out or (Path(info["checkpoint"]) / "eval" if info else Path("runs/eval"))
    written = write_report(results, out)
    log_wandb(results, out, mode=args.wandb, project=args.wandb_project, name=out.name, images=written)
    print(f"wrote {', '.join(str(p) for p in written.values())}")
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_logging("INFO")
    try:
        evaluate(args)
    except (CheckpointError, DataError, ValueError, FileNotFoundError, KernelFallbackError, KernelSettingsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
