"""The baseline Transformer <-> transformers' native `LlamaForCausalLM` (model_type "llama").

Owns the config map (ModelConfig <-> `LlamaConfig`) and the state_dict key map, both directions. Our
attention layers are Llama's: RoPE (rotate-half), grouped-query heads, RMSNorm before the mixer and the
SwiGLU FFN, no biases; every tensor maps one to one, unchanged.
"""

import torch
from transformers import LlamaConfig

from models.config import ModelConfig

MODEL_TYPE = "llama"


def check_exportable(cfg: ModelConfig) -> None:
    if set(cfg.layer_mixers()) != {"attention"}:
        raise ValueError(f"transformers' LlamaForCausalLM has attention layers only; this model has {cfg.layer_mixers()}")
    if not cfg.ffn_hidden_size:
        raise ValueError("transformers' LlamaForCausalLM blocks have an FFN; this model has model.ffn_hidden: 0")
    if cfg.logits_soft_cap is not None:
        raise ValueError("transformers' LlamaForCausalLM does not cap logits; set model.logits_soft_cap: null")


def to_hf_config(cfg: ModelConfig) -> LlamaConfig:
    check_exportable(cfg)
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.attention.n_kv_heads or cfg.n_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.attention.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def from_hf_config(hf) -> ModelConfig:
    """A Llama config as ours; features our attention mixer does not have are refused by name."""
    rope = getattr(hf, "rope_parameters", None) or {"rope_theta": hf.rope_theta, "rope_type": "default"}
    unsupported = {
        "hidden_act": hf.hidden_act != "silu",
        "attention_bias": getattr(hf, "attention_bias", False),
        "mlp_bias": getattr(hf, "mlp_bias", False),
        "rope scaling": rope.get("rope_type", "default") != "default",
        "head_dim": getattr(hf, "head_dim", None) not in (None, hf.hidden_size // hf.num_attention_heads),
    }
    if any(unsupported.values()):
        raise ValueError(f"this Llama config uses {[k for k, v in unsupported.items() if v]}, which the baseline "
                         "attention mixer does not implement")
    return ModelConfig(
        vocab_size=hf.vocab_size,
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        ffn_hidden=hf.intermediate_size,
        norm_eps=hf.rms_norm_eps,
        tie_embeddings=hf.tie_word_embeddings,
        max_seq_len=hf.max_position_embeddings,
        attention={"n_kv_heads": hf.num_key_value_heads, "rope_theta": rope["rope_theta"]},
    )


def _key_map(cfg: ModelConfig) -> dict[str, str]:
    """Our state_dict key -> transformers' key."""
    keys = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "lm_head.weight": "lm_head.weight"}
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        keys[ours + "mixer_norm.weight"] = theirs + "input_layernorm.weight"
        keys[ours + "ffn_norm.weight"] = theirs + "post_attention_layernorm.weight"
        keys |= {ours + f"mixer.{x}_proj.weight": theirs + f"self_attn.{x}_proj.weight" for x in "qkvo"}
        keys |= {ours + f"ffn.{x}.weight": theirs + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
    return keys


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state_dict with transformers' keys; a tied LM head is left out (transformers re-ties it)."""
    keys = _key_map(cfg)
    return {keys[k]: v for k, v in state.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}


def from_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers' state_dict with our keys (a tied LM head taken from the embedding)."""
    keys = {v: k for k, v in _key_map(cfg).items()}
    ours = {keys[k]: v for k, v in state.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    if cfg.tie_embeddings:
        ours["lm_head.weight"] = ours["embed.weight"]
    return ours
