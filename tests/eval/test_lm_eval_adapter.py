"""The lm-eval adapter runs offline on local task files and scores exactly as lm-eval's own `hf` model.

The same tiny xLSTM is scored twice: through our "hybrid" adapter (CausalLM, `step` decoding) and through
lm-eval's HFLM on its export loaded by transformers' native xLSTMForCausalLM. Four tasks cover the four
request types: multiple choice, plain loglikelihood, rolling loglikelihood (perplexity) and generation.
"""

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from eval.lm_eval_adapter import HybridLM, hf_tokenizer, run_lm_eval, task_metrics
from models import CausalLM
from models.hf import export_hf
from tests.models.test_xlstm import tiny_cfg

WORDS = "red green blue cat dog fish one two three apple pear plum sun moon star river hill road".split()
MAX_LENGTH = 48


def _sentences(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(torch.randint(4, 12, (1,), generator=g)),),
                                                     generator=g).tolist()) for _ in range(n)]


def _write_tasks(root: Path) -> list[str]:
    """Four tasks over local JSON files (nothing downloaded)."""
    text = _sentences(40, seed=1)
    rows = {
        "mc": [{"question": f"{s} is", "choices": WORDS[i % 5:i % 5 + 3], "answer": i % 3} for i, s in enumerate(text[:8])],
        "ll": [{"context": s.rsplit(" ", 1)[0], "continuation": " " + s.rsplit(" ", 1)[1]} for s in text[8:16]],
        # Long enough for several rolling windows of MAX_LENGTH tokens.
        "roll": [{"text": " ".join(text[16 + 4 * i:20 + 4 * i]) * (1 + i % 3)} for i in range(4)],
        "gen": [{"prompt": s + " =", "answer": s.split()[0]} for s in text[32:40]],
    }
    for name, data in rows.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    common = "dataset_path: json\ntest_split: train\n"

    def files(name):
        return f"dataset_kwargs:\n  data_files:\n    train: {root / name}.jsonl\n"

    (root / "t_mc.yaml").write_text(
        f"task: t_mc\n{common}{files('mc')}output_type: multiple_choice\ndoc_to_text: '{{{{question}}}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (root / "t_ll.yaml").write_text(
        f"task: t_ll\n{common}{files('ll')}output_type: loglikelihood\ndoc_to_text: '{{{{context}}}}'\n"
        "doc_to_target: '{{continuation}}'\nmetric_list:\n  - metric: perplexity\n  - metric: acc\n")
    (root / "t_roll.yaml").write_text(
        f"task: t_roll\n{common}{files('roll')}output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n")
    (root / "t_gen.yaml").write_text(
        f"task: t_gen\n{common}{files('gen')}output_type: generate_until\ndoc_to_text: '{{{{prompt}}}}'\n"
        "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n  until: ['\\n', '.']\n  max_gen_toks: 6\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    return ["t_mc", "t_ll", "t_roll", "t_gen"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[CausalLM, Path]:
    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(_sentences(200, seed=0), trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer.save(str(root / "tokenizer.json"))

    # A few SGD steps on the sentences so that the model prefers some continuations (and no gate is at init).
    torch.manual_seed(0)
    model = CausalLM(tiny_cfg(vocab_size=tokenizer.get_vocab_size(), max_seq_len=MAX_LENGTH))
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    ids = [tokenizer.encode(s).ids for s in _sentences(64, seed=2)]
    for _ in range(10):
        batch = torch.tensor([(x + [0] * 13)[:13] for x in ids])
        model(batch[:, :-1], labels=batch[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad()
    folder = export_hf(model.eval(), root / "hf", tokenizer_file=str(root / "tokenizer.json"))
    return model, folder


def test_adapter_matches_lm_eval_hf_model(exported, tmp_path):
    from lm_eval.models.huggingface import HFLM

    model, folder = exported
    tasks = _write_tasks(tmp_path)
    ours = HybridLM(model=model, tokenizer=str(folder), batch_size=4, max_length=MAX_LENGTH)
    theirs = HFLM(pretrained=str(folder), batch_size=1, max_length=MAX_LENGTH, device="cpu", dtype="float32")
    res_ours = run_lm_eval(ours, tasks, task_dir=str(tmp_path), log_samples=True)
    res_theirs = run_lm_eval(theirs, tasks, task_dir=str(tmp_path), log_samples=True)

    m_ours, m_theirs = task_metrics(res_ours), task_metrics(res_theirs)
    assert set(m_ours) == set(tasks)
    for task in tasks:
        assert m_ours[task].keys() == m_theirs[task].keys()
        for metric, value in m_ours[task].items():
            assert value == pytest.approx(m_theirs[task][metric], rel=1e-4, abs=1e-4), (task, metric)
    # Sample by sample: every log-likelihood within 1e-4, every generated string identical.
    for task in tasks:
        for a, b in zip(res_ours["samples"][task], res_theirs["samples"][task], strict=True):
            for ra, rb in zip(a["filtered_resps"], b["filtered_resps"], strict=True):
                if isinstance(ra, str):
                    assert ra == rb, task
                else:
                    ra = ra if isinstance(ra, list | tuple) else [ra]
                    rb = rb if isinstance(rb, list | tuple) else [rb]
                    assert float(ra[0]) == pytest.approx(float(rb[0]), abs=1e-4), task
                    if len(ra) > 1:
                        assert bool(ra[1]) == bool(rb[1]), task
    # The generation task really generated something (not an empty-string agreement).
    assert any(s["filtered_resps"][0] for s in res_ours["samples"]["t_gen"])


def test_read_twice_repeats_the_context(exported):
    model, folder = exported
    tok = hf_tokenizer(folder)
    lm = HybridLM(model=model, tokenizer=tok, read_twice=True)
    assert lm._twice("a b") == "a b\n\na b"
    assert HybridLM(model=model, tokenizer=tok)._twice("a b") == "a b"


# configs/tiny/<config> with overrides; sliding window has no tiny config of its own.
FAMILIES = {name: (name, {}) for name in ["transformer", "xlstm", "mamba", "mamba2", "hgrn2", "mom", "bst", "scout",
                                           "gated_deltanet", "hybrid", "hybrid_gdn"]}
FAMILIES["sliding_window"] = ("transformer", {"mixer": "sliding_window", "sliding_window": {"window": 16}})


@pytest.mark.parametrize("family", list(FAMILIES))
def test_evaluate_cli_runs_lm_eval_on_every_family_export(family, exported, tmp_path):
    """Every family's export through the CLI, read back by load_hf: a multiple-choice and a generation task
    (decoding with the family's `step`), whose metrics equal the adapter's on the model in memory. Rolling
    perplexity is test_adapter_matches_lm_eval_hf_model's (one family is enough for the windowing)."""
    import yaml
    from harness import TINY

    from launch.evaluate import main as evaluate_main
    from models import ModelConfig

    _, xlstm_folder = exported
    torch.manual_seed(0)
    config, overrides = FAMILIES[family]
    raw = yaml.safe_load((TINY / f"{config}.yaml").read_text())["model"]
    model = CausalLM(ModelConfig(**raw | overrides | {"vocab_size": 320, "max_seq_len": MAX_LENGTH})).eval()
    folder = export_hf(model, tmp_path / family, tokenizer_file=str(xlstm_folder / "tokenizer.json"))
    tasks = ["t_mc", "t_gen"]
    _write_tasks(tmp_path)
    out = tmp_path / "eval"
    assert evaluate_main(["--checkpoint", str(folder), "--suite", "lm_eval", "--tasks", ",".join(tasks),
                          "--task-dir", str(tmp_path), "--batch-size", "4", "--device", "cpu",
                          "--wandb", "disabled", "--out", str(out)]) == 0
    written = json.loads((out / "results.json").read_text())["lm_eval"]
    direct = task_metrics(run_lm_eval(HybridLM(model=model, tokenizer=str(folder), batch_size=2), tasks,
                                      task_dir=str(tmp_path)))
    assert written.keys() == direct.keys() == set(tasks)
    for task in direct:
        assert written[task] == pytest.approx(direct[task], rel=1e-5)
    assert "| t_mc | acc |" in (out / "summary.md").read_text()
