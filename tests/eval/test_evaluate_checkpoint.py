"""launch/evaluate.py on a real (tiny, 2-rank DeepSpeed) checkpoint: perplexity by length and passkey (also
read twice).

The JSON's numbers are checked against a direct computation written here: the checkpoint's weights loaded
by hand, the held-out tokens read from the shard files, cross-entropy by torch, greedy decoding by the
model's own `generate`.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from harness import TINY
from tokenizers import Tokenizer

from data import open_split
from eval.passkey import build_prompt
from launch.evaluate import main as evaluate_main
from models import CausalLM, ModelConfig
from train.checkpoint import complete_checkpoints, consolidated_state_dict

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_ppl_by_length_and_passkey_report(train, tmp_path, stdlib_shards):
    run = train(TINY / "transformer.yaml", "schedule.steps=6", "schedule.warmup_steps=0", "checkpoint.every=6",
                "logging.every=3")
    out = tmp_path / "eval"
    lengths = [16, 64, 128, 256]
    rc = evaluate_main(["--checkpoint", str(run.run_dir), "--suite", "ppl,ppl_by_length,passkey", "--out", str(out),
                        "--lengths", ",".join(map(str, lengths)), "--max-tokens", "1024", "--batch-size", "4",
                        "--chunk-size", "64", "--passkey-lengths", "32,100,160", "--passkey-depths", "0,0.5,1",
                        "--passkey-trials", "2", "--read-twice", "--device", "cpu", "--wandb", "disabled"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    for name in ("ppl_vs_length.png", "passkey_heatmap.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    summary = (out / "summary.md").read_text()
    assert "| length | tokens | ppl | ppl (second half) |" in summary and "## Passkey retrieval (" in summary
    assert "## Passkey retrieval, read twice" in summary

    # Direct computation: weights, held-out tokens, windows and cross-entropy, all by hand.
    ckpt = complete_checkpoints(run.run_dir / "checkpoints")[-1]
    assert results["meta"]["checkpoint"] == str(ckpt)
    config, state = consolidated_state_dict(ckpt)
    model = CausalLM(ModelConfig(**config))
    model.load_state_dict(state)
    model.eval()
    stream = np.concatenate([np.asarray(t, dtype=np.int64) for t in open_split(stdlib_shards, "val").tokens])

    def direct_ppl(L: int) -> tuple[float, float, int]:
        n = max(1, min((len(stream) - 1) // L, 1024 // L))
        w = torch.tensor(np.stack([stream[i * L:i * L + L + 1] for i in range(n)]))
        with torch.no_grad():
            nll = F.cross_entropy(model(w[:, :-1]).logits.transpose(1, 2), w[:, 1:], reduction="none")
        return nll.mean().exp().item(), nll[:, L // 2:].mean().exp().item(), nll.numel()

    assert results["ppl"]["length"] == 128
    ppl, _, tokens = direct_ppl(128)
    assert results["ppl"]["ppl"] == pytest.approx(ppl, rel=1e-4) and results["ppl"]["tokens"] == tokens
    by_length = {r["length"]: r for r in results["ppl_by_length"]["lengths"]}
    assert sorted(by_length) == lengths
    for L in lengths:
        ppl, tail, tokens = direct_ppl(L)
        assert by_length[L]["ppl"] == pytest.approx(ppl, rel=1e-4), L
        assert by_length[L]["ppl_tail"] == pytest.approx(tail, rel=1e-4), L
        assert by_length[L]["tokens"] == tokens

    # Passkey: accuracy is "greedy decoding emits the answer"; check it with the model's own generate. Read
    # twice (JRT), the prompt is one reading, a blank line and the same reading again.
    tok = Tokenizer.from_file(str(stdlib_shards / "tokenizer.json"))
    keys = [str(k) for k in np.random.default_rng(0).integers(10000, 100000, size=2)]
    for section, twice in (("passkey", False), ("passkey_read_twice", True)):
        cells = results[section]["cells"]
        assert results[section]["skipped"] == [32]  # shorter than the template itself
        assert len(cells) == 2 * 3
        for cell in cells:
            hits, logps = [], []
            for key in keys:
                p = build_prompt(lambda s: tok.encode(s).ids, cell["length"], cell["depth"], key, read_twice=twice)
                text = tok.decode(p.prompt)
                assert text.count("What is the pass key?") == text.count(f"The pass key is {key}.") == 1 + twice
                assert (len(p.prompt) > cell["length"]) == twice
                prompt = torch.tensor([p.prompt])
                generated = model.generate(prompt, max_new_tokens=len(p.answer))[0, len(p.prompt):].tolist()
                hits.append(generated == p.answer)
                with torch.no_grad():
                    logits = model(torch.tensor([p.prompt + p.answer[:-1]])).logits[0, len(p.prompt) - 1:]
                logps.append(F.log_softmax(logits, -1)[torch.arange(len(p.answer)), p.answer].mean().item())
            assert cell["accuracy"] == pytest.approx(np.mean(hits)), (section, cell)
            assert cell["answer_logprob"] == pytest.approx(np.mean(logps), abs=1e-4), (section, cell)


def test_periodic_eval_returns_flat_metrics_and_restores_train_mode(stdlib_shards):
    from eval.periodic import PeriodicEvalConfig, evaluate_during_training

    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=2048, d_model=32, n_layers=1, n_heads=2, mixer="mlstm"))
    model.train()
    cfg = PeriodicEvalConfig(every=10, length_multiples=[1, 2], max_tokens=256)
    metrics = evaluate_during_training(model, cfg, stdlib_shards, seq_len=64)
    assert model.training
    assert set(metrics) == {"eval/ppl@64", "eval/ppl_tail@64", "eval/ppl@128", "eval/ppl_tail@128"}
    assert all(np.isfinite(v) and v > 1 for v in metrics.values())
