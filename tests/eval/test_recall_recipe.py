"""The MQAR recipe: a tiny attention model learns MQAR on the CPU, and the report puts families side by side.

The recipe is configs/recall/mqar.yaml shrunk by overrides (shorter sequences, fewer pairs) so that
attention reaches its target within the test's budget; the other families train a few steps only, enough
to exercise their path through the recipe and the side-by-side report, not to judge them.
"""

import time
from pathlib import Path

import pytest

from eval.recall_recipe import load_recipe, run_recipe
from eval.report import write_report

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "recall" / "mqar.yaml"
SMALL = {"task.vocab_size": 64, "task.train_settings": [[32, 2], [32, 4]], "task.train_examples": 4000,
         "task.eval_seq_lens": [32], "task.eval_kv_pairs": [2, 4], "task.eval_examples": 200,
         "train.batch_size": 64, "train.lr": 3e-3, "train.warmup_steps": 20, "train.eval_every": 25}


def test_shipped_recipe_builds_every_family():
    recipe = load_recipe(RECIPE)
    families = {name: recipe.build_model_config(name).mixer for name in recipe.models}
    assert set(families.values()) == {"attention", "mlstm", "mamba", "mamba2", "gated_deltanet"}
    assert [(s.seq_len, s.num_kv_pairs) for s in recipe.grid()] == [(64, 2), (64, 4), (64, 8), (64, 16)]


def test_attention_solves_small_mqar_and_report_compares_families(tmp_path):
    start = time.perf_counter()
    attention = run_recipe(load_recipe(RECIPE, {**SMALL, "train.steps": 800, "train.target_accuracy": 0.95}),
                           only=["attention"])
    seconds = time.perf_counter() - start
    grid = attention["models"]["attention"]["grid"]
    assert min(g["accuracy"] for g in grid) >= 0.9, grid
    print(f"attention: {grid} in {seconds:.1f} s ({attention['models']['attention']['steps']} steps)")

    others = run_recipe(load_recipe(RECIPE, {**SMALL, "train.steps": 5}), only=["mlstm", "mamba", "mamba2", "gated_deltanet"])
    mqar = {"models": {**attention["models"], **others["models"]}}
    written = write_report({"mqar": mqar}, tmp_path)
    assert written["recall_plot"].read_bytes()[:4] == b"\x89PNG"
    table = written["markdown"].read_text()
    assert "| seq_len | kv pairs | attention | mlstm | mamba | mamba2 | gated_deltanet |" in table
    assert table.count("| 32 | ") == 2
    # Attention's state is its KV cache (2 layers x k, v x 32 positions x 64 wide x 4 bytes); the recurrences'
    # states do not depend on the length.
    assert mqar["models"]["attention"]["state_bytes"] == 2 * 2 * 32 * 64 * 4
    assert all(m["state_bytes"] > 0 for m in mqar["models"].values())


@pytest.mark.parametrize("bad", [{"task.train_settings": [[32, 9]]}, {"models.attention.mixer": "nope"}])
def test_bad_recipes_fail_with_a_message(bad):
    recipe = load_recipe(RECIPE, {**SMALL, **bad})
    with pytest.raises(ValueError):
        run_recipe(recipe, only=["attention"])
