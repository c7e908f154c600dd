"""Mamba-2 (models/mixers/mamba2.py, models/hf/mamba2.py) against transformers' Mamba2ForCausalLM on its CPU
path (`torch_forward`): same weights give the same logits for lengths that are not multiples of the chunk;
forward, prefill and step agree; the export loads in transformers and generates our tokens; config.json
infinities; parameter counts of the real configs. Shared checks come from test_mamba.py.
"""

import json
import math

import pytest
import transformers
from harness import ROOT, transformers_own_auto_classes
from test_mamba import (
    check_export_loads_in_transformers,
    check_forward_prefill_and_steps_agree,
    check_logits_equal_transformers,
    check_param_count,
    no_decay_names,
    tiny_model,
    transformers_twin,
)

from models.hf import mamba2 as hf_mamba2
from models.hf.config_json import load_hf_config


@pytest.fixture(autouse=True)
def _transformers_own_classes():
    # Other test modules import flash-linear-attention, which takes over these Auto entries.
    with transformers_own_auto_classes("mamba2"):
        yield


def twin(model):
    return transformers_twin(model, hf_mamba2, transformers.Mamba2ForCausalLM)


@pytest.mark.parametrize("length", [1, 21, 32, 75])  # chunk_size 32: within, at and past chunk boundaries
def test_logits_equal_transformers_mamba2(length):
    model = tiny_model("mamba2")
    check_logits_equal_transformers(model, twin(model), length)


def test_logits_equal_transformers_with_groups_biases_and_untied_head():
    mamba2 = {"d_state": 8, "headdim": 8, "n_groups": 4, "chunk_size": 16, "bias": True, "d_conv": 3}
    model = tiny_model("mamba2", tie_embeddings=False, mamba2=mamba2)
    assert model.blocks[0].mixer.n_heads == 16
    check_logits_equal_transformers(model, twin(model), 37)


def test_logits_equal_transformers_with_dt_limit():
    mamba2 = {"d_state": 16, "headdim": 16, "chunk_size": 32, "dt_limit": (0.01, 0.05)}
    model = tiny_model("mamba2", mamba2=mamba2)
    hf = twin(model)
    assert hf.config.time_step_limit == (0.01, 0.05)
    check_logits_equal_transformers(model, hf, 40)


def test_forward_prefill_and_steps_agree_mamba2():
    # Chunks of 4: the prefill pieces (3 and 4 tokens) start and end inside chunks.
    model = tiny_model("mamba2", mamba2={"d_state": 16, "headdim": 16, "chunk_size": 4})
    check_forward_prefill_and_steps_agree(model)


def test_export_loads_in_transformers_and_generates_our_tokens_mamba2(tmp_path):
    model = tiny_model("mamba2")
    back = check_export_loads_in_transformers(model, tmp_path, transformers.Mamba2ForCausalLM)
    expected = {f"blocks.{i}.mixer.{n}" for i in range(2) for n in ("A_log", "D", "dt_bias")}
    assert no_decay_names(back) >= expected
    # What transformers wrote for time_step_limit (0, inf) reads back as our "no clamp".
    assert load_hf_config(tmp_path)["time_step_limit"] == [0.0, math.inf]
    assert back.cfg.mamba2.dt_limit is None


@pytest.mark.parametrize(
    "spelling",
    ['{"__float__": "Infinity"}', "Infinity"],
    ids=["transformers-5-tagged", "transformers-4-bare-token"],
)
def test_hf_config_reader_accepts_both_infinity_spellings(tmp_path, spelling):
    (tmp_path / "config.json").write_text(f'{{"model_type": "mamba2", "time_step_limit": [0.0, {spelling}]}}')
    assert load_hf_config(tmp_path) == {"model_type": "mamba2", "time_step_limit": [0.0, math.inf]}
    if spelling.startswith("{"):  # strict JSON: a plain reader sees a dict, not a float
        plain = json.loads((tmp_path / "config.json").read_text())
        assert plain["time_step_limit"][1] == {"__float__": "Infinity"}
    # The decoded dict goes through transformers' config class into ours.
    raw = load_hf_config(tmp_path / "config.json")
    hf = transformers.Mamba2Config(
        hidden_size=64, num_heads=8, head_dim=16, n_groups=1, state_size=16, num_hidden_layers=2,
        vocab_size=100, time_step_limit=raw["time_step_limit"],
    )
    assert hf_mamba2.from_hf_config(hf).mamba2.dt_limit is None


def test_mixer_rejects_heads_that_do_not_split():
    with pytest.raises(ValueError, match="mamba2.headdim=48"):
        tiny_model("mamba2", mamba2={"headdim": 48})


@pytest.mark.parametrize("size,published,tolerance", [
    ("130m", 130e6, 0.02),
    ("370m", 370e6, 0.02),
    # state-spaces/mamba2-1.3b is Mamba-1 1.4B's shape (width 2048, 48 layers): 1.344B, named "1.3b".
    ("1.3b", 1.3e9, 0.04),
    ("2.7b", 2.7e9, 0.02),
])
def test_param_counts_match_published_and_transformers_mamba2(size, published, tolerance):
    check_param_count(ROOT / "configs" / f"mamba2_{size}.yaml", published, tolerance,
                      transformers.Mamba2ForCausalLM, hf_mamba2)
