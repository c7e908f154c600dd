"""The MQAR recipe reproduces Zoology's qualitative result at a reduced size, and its report covers every run.

The property, not a number the code computed: after the same number of steps at the same width, attention
recalls 8 key-value pairs (>= 0.95), a fixed-state recurrence (Gated DeltaNet) is measurably below it, and
the same recurrence trained and evaluated with the context read twice (JRT) recalls more than without.
"Measurably": 200 held-out examples x 8 queries give a standard error of about 0.012 on an accuracy, so the
margins below (0.1 and 0.05) are 4 to 8 standard errors.
"""

import time
from pathlib import Path

import pytest

from eval.recall_recipe import load_recipe, run_recipe
from eval.report import write_report

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "recall" / "mqar.yaml"
REDUCED = {"task.train_settings": [[32, 4], [32, 8]], "task.train_examples": 4000, "task.eval_seq_lens": [32],
           "task.eval_kv_pairs": [8], "task.eval_examples": 200, "train.eval_every": 50}
FAMILIES = {"attention", "sliding_window", "mlstm", "mamba", "mamba2", "hgrn2", "mom", "bst", "scout",
            "gated_deltanet"}


def test_shipped_recipe_has_every_family_and_reports_every_run(tmp_path):
    recipe = load_recipe(RECIPE)
    assert {recipe.build_model_config(name).layer_mixers()[0] for name in recipe.models} == FAMILIES
    assert [(s.seq_len, s.num_kv_pairs) for s in recipe.grid()] == [(32, 2), (32, 4), (32, 8)]
    # Every run of the shipped recipe, 2 steps each: the report has a row per run and both plots.
    quick = load_recipe(RECIPE, {"train.steps": 2, "task.train_examples": 64, "task.eval_examples": 8})
    mqar = run_recipe(quick, log=lambda _: None)
    names = [name for name, _, _ in recipe.runs()]
    assert list(mqar["models"]) == names and any(n.endswith("+jrt") for n in names)
    written = write_report({"mqar": mqar}, tmp_path)
    for plot in ("recall_plot", "recall_state_plot"):
        assert written[plot].read_bytes()[:4] == b"\x89PNG"
    table = written["markdown"].read_text()
    assert all(f"| {n} | " in table for n in names)
    # Attention's state is its KV cache (2 layers x k, v x 32 positions x 64 wide x 4 bytes); a recurrence's
    # does not depend on the length, and grows with its width.
    models = mqar["models"]
    assert models["attention"]["state_bytes"] == 2 * 2 * 32 * 64 * 4
    assert models["mlstm_d32"]["state_bytes"] < models["mlstm"]["state_bytes"] < models["mlstm_d128"]["state_bytes"]
    assert models["mlstm+jrt"]["state_bytes"] == models["mlstm"]["state_bytes"] and models["mlstm+jrt"]["read_twice"]


def test_attention_recalls_where_a_recurrence_falls_behind_and_reading_twice_helps():
    start = time.perf_counter()
    recipe = load_recipe(RECIPE, {**REDUCED, "train.steps": 500, "read_twice": ["gated_deltanet"]})
    results = run_recipe(recipe, only=["attention", "gated_deltanet"])["models"]
    acc = {name: m["grid"][0]["accuracy"] for name, m in results.items()}
    print(f"MQAR T=32, 8 pairs: {acc} in {time.perf_counter() - start:.0f} s")
    assert results["attention"]["d_model"] == results["gated_deltanet"]["d_model"]
    assert acc["attention"] >= 0.95, acc
    assert acc["gated_deltanet"] < acc["attention"] - 0.1, acc
    assert acc["gated_deltanet+jrt"] > acc["gated_deltanet"] + 0.05, acc


@pytest.mark.parametrize("bad", [{"task.train_settings": [[32, 9]]}, {"models.attention.mixer": "nope"}])
def test_bad_recipes_fail_with_a_message(bad):
    recipe = load_recipe(RECIPE, {**REDUCED, **bad})
    with pytest.raises(ValueError):
        run_recipe(recipe, only=["attention"])


def test_read_twice_must_name_a_model():
    with pytest.raises(ValueError, match="read_twice names \\['nope'\\]"):
        load_recipe(RECIPE, {"read_twice": ["nope"]})
