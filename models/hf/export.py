"""Write a CausalLM as a Hugging Face folder that `AutoModelForCausalLM.from_pretrained` loads, and read it back.

Family-agnostic: each family's module in `FAMILIES` owns its config and key maps (`MODEL_TYPE`,
`to_hf_config`, `from_hf_config`, `to_hf_state_dict`, `from_hf_state_dict`). A family becomes
exportable by adding one line here.
"""

import importlib
import json
import shutil
from pathlib import Path
from types import ModuleType

import torch
from safetensors.torch import load_file, save_file

from models.lm import CausalLM

# Mixer name -> module holding that family's map to its transformers classes.
FAMILIES: dict[str, str] = {
    "attention": "models.hf.llama",
    "mlstm": "models.hf.xlstm",
    "mamba": "models.hf.mamba",
    "mamba2": "models.hf.mamba2",
    "hgrn2": "models.hf.hgrn2",
    "mom": "models.hf.mom",
    "gated_deltanet": "models.hf.gated_deltanet",
}

# Special-token spellings of common tokenizers (GPT-NeoX-20B, Llama, T5-style), for tokenizer_config.json.
_SPECIAL_TOKENS = {
    "eos_token": ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>"),
    "bos_token": ("<s>", "<|begin_of_text|>", "<bos>"),
    "pad_token": ("<|padding|>", "<pad>"),
}


def _family_for_mixers(mixers: list[str]) -> ModuleType:
    names = set(mixers)
    # Fallback to generated trust_remote_code files for layers without a native class (models/hf/remote_code.py).
    if importlib.import_module("models.hf.remote_code").needs_remote_code(mixers):
        return importlib.import_module("models.hf.remote_code")
    # A family whose class also holds attention layers (fla's `attn` field) takes its hybrids with them.
    for family in names & FAMILIES.keys():
        module = importlib.import_module(FAMILIES[family])
        if names - getattr(module, "ATTENTION_MIXERS", frozenset()) == {family}:
            return module
    if len(names) != 1 or next(iter(names)) not in FAMILIES:
        raise ValueError(
            f"no Hugging Face export for layers {sorted(names)}; exportable families: {sorted(FAMILIES)}"
        )
    return importlib.import_module(FAMILIES[next(iter(names))])


def _family_for_model_type(model_type: str) -> ModuleType:
    for module_name in [*FAMILIES.values(), "models.hf.remote_code"]:
        module = importlib.import_module(module_name)
        if module.MODEL_TYPE == model_type:
            return module
    raise ValueError(f"no mapping for Hugging Face model_type {model_type!r}; known families: {sorted(FAMILIES)}")


def _special_tokens(tokenizer_file: Path) -> dict[str, tuple[str, int]]:
    """Special tokens of a tokenizers JSON file recognised by spelling: role -> (token, id)."""
    added = {t["content"]: t["id"] for t in json.loads(tokenizer_file.read_text()).get("added_tokens", [])}
    found = {}
    for role, spellings in _SPECIAL_TOKENS.items():
        token = next((s for s in spellings if s in added), None)
        if token is not None:
            found[role] = (token, added[token])
    # GPT-NeoX-style vocabularies have one document separator that serves as both bos and eos.
    if "bos_token" not in found and "eos_token" in found:
        found["bos_token"] = found["eos_token"]
    return found


def export_hf(model: CausalLM, out_dir: str | Path, tokenizer_file: str | None = None) -> Path:
    """Write config.json, model.safetensors and, given a tokenizers JSON file, the tokenizer files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    family = _family_for_mixers(model.cfg.layer_mixers())
    hf_config = family.to_hf_config(model.cfg)
    hf_config.dtype = next(model.parameters()).dtype
    if not hasattr(hf_config, "max_position_embeddings"):  # xLSTM's and Mamba's configs have no field for it
        hf_config.max_seq_len = model.cfg.max_seq_len  # the length it trained at, read back by load_hf

    if tokenizer_file is not None:
        special = _special_tokens(Path(tokenizer_file))
        shutil.copyfile(tokenizer_file, out / "tokenizer.json")
        tokenizer_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": model.cfg.max_seq_len,
            **{role: token for role, (token, _) in special.items()},
        }
        (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
        for role, (_, token_id) in special.items():
            setattr(hf_config, role + "_id", token_id)

    hf_config.save_pretrained(out)
    if hasattr(family, "write_code"):  # remote-code fallback: ship the generated modeling files
        family.write_code(model.cfg, out)
    state = family.to_hf_state_dict(model.state_dict(), model.cfg)
    # safetensors refuses views and shared storage: write each tensor as its own contiguous copy.
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()},
              out / "model.safetensors", metadata={"format": "pt"})
    return out


def load_hf(folder: str | Path) -> CausalLM:
    """A CausalLM from a Hugging Face folder of a mapped family (single or sharded safetensors)."""
    from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig

    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text())  # Python's json reads transformers' `Infinity`
    family = _family_for_model_type(raw.get("model_type", ""))
    if raw.get("model_type") in CONFIG_MAPPING:
        hf_config = AutoConfig.from_pretrained(folder)
    else:
        # model_types that transformers knows only after importing fla, or through remote code (ours): every
        # field is in config.json, which is all the family's map reads. No remote code runs here.
        hf_config = PretrainedConfig.from_dict(raw)
    cfg = family.from_hf_config(hf_config)
    if "max_seq_len" in raw:
        cfg = cfg.model_copy(update={"max_seq_len": int(raw["max_seq_len"])})
    index = folder / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"
    ]
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(folder / shard))
    with torch.device("meta"):  # no random init of weights that are overwritten next
        model = CausalLM(cfg)
    model.load_state_dict(family.from_hf_state_dict(state, cfg), strict=True, assign=True)
    if cfg.tie_embeddings:  # assign=True gives each name its own Parameter: tie them again
        model.lm_head.weight = model.embed.weight
    return model
