"""trust_remote_code export (models/hf/remote_code.py): BST, SCOUT and pattern hybrids load with
AutoModelForCausalLM in a process that cannot import this project, and give our logits."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from harness import TINY

from models import CausalLM, ModelConfig
from models.hf import export_hf
from models.hf.remote_code import needs_remote_code
from train.config import load_config

MIXED = ModelConfig(vocab_size=300, d_model=32, n_layers=3, n_heads=4, pattern="WBS", attention={"n_kv_heads": 2},
                    sliding_window={"window": 6}, bst={"block_size": 8, "context": "single_head", "d_state": 4},
                    scout={"segment_size": 5, "local_mixer": "sliding_window"})
MODELS = {"bst": load_config(TINY / "bst.yaml").model, "scout": load_config(TINY / "scout.yaml").model,
          "hybrid": load_config(TINY / "hybrid.yaml").model, "mixed": MIXED}

LOAD_AND_RUN = textwrap.dedent("""
    import sys, torch
    # An editable install (`pip install -e .`, as scripts/setup.sh does) maps this project's packages into
    # every interpreter through a meta-path finder: drop it, as a user without the project would not have it.
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    try:
        import models  # noqa: F401
        sys.exit("this project is importable: the test would not prove the folder is self-contained")
    except ImportError:
        pass
    from transformers import AutoModelForCausalLM
    ids = torch.load("ids.pt")
    for name in sys.argv[1:]:
        model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=True).eval()
        with torch.no_grad():
            torch.save(model(ids[name]).logits, f"{name}.logits.pt")
""")


def test_remote_code_folders_load_without_the_project_and_match_our_logits(tmp_path):
    want, ids = {}, {}
    for i, (name, cfg) in enumerate(MODELS.items()):
        torch.manual_seed(i)
        model = CausalLM(cfg).eval()
        export_hf(model, tmp_path / name)
        ids[name] = torch.randint(0, cfg.vocab_size, (2, 41))  # not a multiple of any block or segment
        with torch.no_grad():
            want[name] = model(ids[name]).logits
        assert json.loads((tmp_path / name / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == \
            "modeling_hybrid.HybridForCausalLM"
    torch.save(ids, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_RUN, *MODELS], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in MODELS:
        got = torch.load(tmp_path / f"{name}.logits.pt")
        assert ((got - want[name]).norm() / want[name].norm()).item() < 1e-5, name


def test_generated_modeling_file_inlines_only_what_the_model_needs(tmp_path):
    export_hf(CausalLM(MODELS["hybrid"]), tmp_path)
    source = (tmp_path / "modeling_hybrid.py").read_text()
    compile(source, "modeling_hybrid.py", "exec")
    assert "def _module__models__mixers__mamba2():" in source and "def _module__mixer_kernels__ssd():" in source
    for unused in ("bst", "scout", "mlstm", "hgrn2", "mom", "gated_deltanet"):
        assert f"_module__models__mixers__{unused}" not in source
    assert "\nfrom models" not in source and "\nfrom mixer_kernels" not in source and "\n    from models" not in source


@pytest.mark.parametrize("mixers, remote", [
    (["bst"], True), (["scout"], True), (["sliding_window"], True), (["mamba2", "attention"], True),
    (["mamba2"], False), (["attention"], False), (["mlstm"], False),
    (["mlstm", "attention"], False),  # Triton-backed families are not offered as remote code
    (["gated_deltanet", "attention"], False),  # fla's own class holds this hybrid (models/hf/gated_deltanet.py)
])
def test_remote_code_is_the_fallback_for_layers_without_a_native_class(mixers, remote):
    assert needs_remote_code(mixers) is remote
