"""HGRN2 <-> flash-linear-attention's `HGRN2ForCausalLM` (model_type "hgrn2", fla.models.hgrn2).

Owns the config map (ModelConfig <-> fla's HGRN2Config fields) and the state_dict key map, both ways.
Every tensor maps one to one, unchanged, except fla's model-level `model.lower_bounds` (n_layers, d_model),
which is the stack of our layers' `blocks.{i}.mixer.lower_bound` rows.

fla is not imported here (importing it re-registers transformers' mamba / mamba2 Auto classes): the
exported config is a plain `PretrainedConfig` carrying fla's fields and model_type, which fla's
HGRN2Config reads. Loading the folder with `AutoModelForCausalLM` / `AutoConfig` needs `import fla` first.
"""

import torch
from transformers import PretrainedConfig

from models.config import HGRN2Config, ModelConfig
from models.hf.fla_layout import fla_mlp_hidden, fla_model_fields

MODEL_TYPE = "hgrn2"

_TOP_KEYS = {
    "embed.weight": "model.embeddings.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_BLOCK_KEYS = {
    "mixer_norm.weight": "attn_norm.weight",
    "mixer.q_proj.weight": "attn.q_proj.weight",
    "mixer.f_proj.weight": "attn.f_proj.weight",
    "mixer.i_proj.weight": "attn.i_proj.weight",
    "mixer.g_norm.weight": "attn.g_norm.weight",
    "mixer.o_proj.weight": "attn.o_proj.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "ffn.gate.weight": "mlp.gate_proj.weight",
    "ffn.up.weight": "mlp.up_proj.weight",
    "ffn.down.weight": "mlp.down_proj.weight",
}


class _FlaConfig(PretrainedConfig):
    """A config.json writer for fla's HGRN2Config fields (model_type "hgrn2")."""

    model_type = MODEL_TYPE


def to_hf_config(cfg: ModelConfig) -> PretrainedConfig:
    """Our model config as fla's HGRN2Config fields (fla's fused GPU kernels on, its defaults)."""
    if set(cfg.layer_mixers()) != {"hgrn2"}:
        raise ValueError(f"fla's HGRN2ForCausalLM has HGRN2 layers only; this model has {cfg.layer_mixers()}")
    if cfg.hgrn2.output_norm_eps != 1e-5:
        raise ValueError("fla's HGRN2 output norm uses eps 1e-5 (rms_norm_linear's default); set "
                         f"hgrn2.output_norm_eps: 1.0e-5, got {cfg.hgrn2.output_norm_eps}")
    return _FlaConfig(
        **fla_model_fields(cfg, "HGRN2ForCausalLM"),
        num_heads=cfg.n_heads,
        expand_ratio=cfg.hgrn2.expand_ratio,
        use_short_conv=False,
        use_lower_bound=cfg.hgrn2.use_lower_bound,
        elementwise_affine=True,
    )


def from_hf_config(hf: PretrainedConfig) -> ModelConfig:
    """fla's HGRN2Config (or its config.json fields) as our model config."""
    if getattr(hf, "use_short_conv", False):
        raise ValueError("HGRN2 checkpoints with use_short_conv=True have no counterpart here")
    if getattr(hf, "attn", None):
        raise ValueError("HGRN2 checkpoints with hybrid attention layers (config.attn) have no counterpart here")
    return ModelConfig(
        vocab_size=hf.vocab_size,
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.hidden_size // hf.expand_ratio,
        mixer="hgrn2",
        ffn_hidden=hf.intermediate_size or fla_mlp_hidden(hf.hidden_size, hf.hidden_ratio),
        norm_eps=hf.norm_eps,
        tie_embeddings=hf.tie_word_embeddings,
        init_std=hf.initializer_range,
        max_seq_len=hf.max_position_embeddings,
        hgrn2=HGRN2Config(expand_ratio=hf.expand_ratio, use_lower_bound=hf.use_lower_bound),
    )


def _rename(key: str, top: dict[str, str], block: dict[str, str], src: str, dst: str) -> str:
    if key in top:
        return top[key]
    if key.startswith(src):
        index, _, rest = key[len(src):].partition(".")
        if rest in block:
            return f"{dst}{index}.{block[rest]}"
    raise KeyError(f"no HGRN2 mapping for state_dict key {key!r}")


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state_dict with fla's keys; the per-layer lower-bound rows stacked into `model.lower_bounds`."""
    rows = {k: v for k, v in state.items() if k.endswith(".mixer.lower_bound")}
    out = {_rename(k, _TOP_KEYS, _BLOCK_KEYS, "blocks.", "model.layers."): v
           for k, v in state.items() if k not in rows}
    if rows:
        out["model.lower_bounds"] = torch.stack([rows[f"blocks.{i}.mixer.lower_bound"] for i in range(cfg.n_layers)])
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """fla's HGRN2 state_dict with our keys (the LM head restored from the embedding if tied)."""
    top = {v: k for k, v in _TOP_KEYS.items()}
    block = {v: k for k, v in _BLOCK_KEYS.items()}
    ours = {_rename(k, top, block, "model.layers.", "blocks."): v
            for k, v in state.items() if k != "model.lower_bounds"}
    if "model.lower_bounds" in state:
        for i, row in enumerate(state["model.lower_bounds"].unbind(0)):
            ours[f"blocks.{i}.mixer.lower_bound"] = row
    if cfg.tie_embeddings:
        ours.setdefault("lm_head.weight", ours["embed.weight"])
    return ours
