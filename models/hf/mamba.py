"""Mamba <-> transformers' native `MambaForCausalLM` (model_type "mamba", the state-spaces/mamba-*-hf layout).

Owns the config map (ModelConfig <-> `MambaConfig`) and the state_dict key map, both directions; the
key map is shared with Mamba-2 (models/hf/mamba2.py), whose models are laid out the same way. Blocks are
x + mixer(norm(x)) on both sides, with no FFN, so every tensor maps one to one, unchanged.
"""

import math

import torch
from transformers import MambaConfig as HFMambaConfig

from models.config import MambaConfig, ModelConfig

MODEL_TYPE = "mamba"

# Our key -> transformers' key outside the blocks, and our -> their key prefix inside block i
# ("blocks.{i}." is "backbone.layers.{i}."); mixer parameters keep their names.
TOP_KEYS = {
    "embed.weight": "backbone.embeddings.weight",
    "norm.weight": "backbone.norm_f.weight",
    "lm_head.weight": "lm_head.weight",
}
BLOCK_PREFIXES = {"mixer_norm.": "norm.", "mixer.": "mixer."}

def check_exportable(cfg: ModelConfig, mixer: str, hf_class: str) -> None:
    """transformers' Mamba models are one mixer everywhere, one norm per block, no FFN, no logit cap."""
    if set(cfg.layer_mixers()) != {mixer}:
        raise ValueError(
            f"transformers' {hf_class} has {mixer} layers only; this model has {cfg.layer_mixers()}"
        )
    if cfg.ffn_hidden_size:
        raise ValueError(f"transformers' {hf_class} blocks have no FFN; set model.ffn_hidden: 0")
    if cfg.logits_soft_cap is not None:
        raise ValueError(f"transformers' {hf_class} does not cap logits; set model.logits_soft_cap: null")


def n_heads_field(d_model: int, heads: int) -> int:
    """A value for ModelConfig.n_heads (unread by Mamba mixers, but it must divide d_model)."""
    return heads if d_model % heads == 0 else 1


def to_hf_config(cfg: ModelConfig) -> HFMambaConfig:
    check_exportable(cfg, "mamba", "MambaForCausalLM")
    m = cfg.mamba
    return HFMambaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        state_size=m.d_state,
        num_hidden_layers=cfg.n_layers,
        layer_norm_epsilon=cfg.norm_eps,
        expand=m.expand,
        conv_kernel=m.d_conv,
        use_bias=m.bias,
        use_conv_bias=m.conv_bias,
        time_step_rank=m.dt_rank or math.ceil(cfg.d_model / 16),
        time_step_scale=m.dt_scale,
        time_step_min=m.dt_min,
        time_step_max=m.dt_max,
        time_step_floor=m.dt_init_floor,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def from_hf_config(hf: HFMambaConfig, max_seq_len: int = 2048) -> ModelConfig:
    """transformers' MambaConfig as our model config (max_seq_len is ours only; Mamba trained at 2048)."""
    if hf.hidden_act != "silu":
        raise ValueError(f"only Mamba configs with hidden_act='silu' map to ours, got {hf.hidden_act!r}")
    return ModelConfig(
        vocab_size=hf.vocab_size,
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=1,
        mixer="mamba",
        ffn_hidden=0,
        norm_eps=hf.layer_norm_epsilon,
        tie_embeddings=hf.tie_word_embeddings,
        max_seq_len=max_seq_len,
        mamba=MambaConfig(
            d_state=hf.state_size,
            d_conv=hf.conv_kernel,
            expand=hf.expand,
            # None is transformers' "auto", ceil(d_model / 16): keep it implicit so configs round-trip.
            dt_rank=None if hf.time_step_rank == math.ceil(hf.hidden_size / 16) else int(hf.time_step_rank),
            dt_min=hf.time_step_min,
            dt_max=hf.time_step_max,
            dt_init_floor=hf.time_step_floor,
            dt_scale=hf.time_step_scale,
            conv_bias=hf.use_conv_bias,
            bias=hf.use_bias,
        ),
    )


def _rename(key: str, top: dict[str, str], blocks: tuple[str, str], prefixes: dict[str, str]) -> str:
    """Translate one key: by `top` outside the blocks; inside them
    `{blocks[0]}{i}.{old}rest` -> `{blocks[1]}{i}.{new}rest` for each (old, new) of `prefixes`."""
    if key in top:
        return top[key]
    if key.startswith(blocks[0]):
        index, _, rest = key[len(blocks[0]):].partition(".")
        for old, new in prefixes.items():
            if rest.startswith(old):
                return f"{blocks[1]}{index}.{new}{rest[len(old):]}"
    raise KeyError(f"no Mamba mapping for state_dict key {key!r}")


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state_dict with transformers' keys; a tied LM head is left out (transformers re-ties it)."""
    return {
        _rename(k, TOP_KEYS, ("blocks.", "backbone.layers."), BLOCK_PREFIXES): v
        for k, v in state.items()
        if not (cfg.tie_embeddings and k == "lm_head.weight")
    }


def from_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers' state_dict with our keys (a tied LM head taken from the embedding)."""
    top = {v: k for k, v in TOP_KEYS.items()}
    prefixes = {v: k for k, v in BLOCK_PREFIXES.items()}
    ours = {
        _rename(k, top, ("backbone.layers.", "blocks."), prefixes): v
        for k, v in state.items()
        if not (cfg.tie_embeddings and k == "lm_head.weight")
    }
    if cfg.tie_embeddings:
        ours["lm_head.weight"] = ours["embed.weight"]
    return ours
