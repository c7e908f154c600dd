"""MoM <-> flash-linear-attention's `MomForCausalLM` (model_type "mom", fla.models.mom).

Owns the config map (ModelConfig <-> fla's MomConfig fields) and the state_dict key map, both ways. The
mixer's parameter names are fla's `MomAttention` names, so every tensor maps one to one, unchanged:
`blocks.{i}.mixer.X` <-> `model.layers.{i}.attn.X`. Only the gated-delta-rule backend without a
capacity limit exists in fla (its `capacity` field is unused there).

fla is not imported here (importing it re-registers transformers' mamba / mamba2 Auto classes): the
exported config is a plain `PretrainedConfig` carrying fla's fields and model_type, which fla's
MomConfig reads. Loading the folder with `AutoModelForCausalLM` / `AutoConfig` needs `import fla` first.
"""

import torch
from transformers import PretrainedConfig

from models.config import ModelConfig, MoMConfig
from models.hf.fla_layout import fla_mlp_hidden, fla_model_fields, from_fla, to_fla

MODEL_TYPE = "mom"

class _FlaConfig(PretrainedConfig):
    """A config.json writer for fla's MomConfig fields (model_type "mom")."""

    model_type = MODEL_TYPE


def to_hf_config(cfg: ModelConfig) -> PretrainedConfig:
    """Our model config as fla's MomConfig fields (fla's fused GPU kernels on, its defaults)."""
    m = cfg.mom
    if set(cfg.layer_mixers()) != {"mom"}:
        raise ValueError(f"fla's MomForCausalLM has MoM layers only; this model has {cfg.layer_mixers()}")
    if m.backend != "gated_delta_rule" or m.capacity_factor is not None:
        raise ValueError("fla's MoM has gated-delta-rule memories and no capacity limit: set "
                         "mom.backend: gated_delta_rule and mom.capacity_factor: null to export")
    return _FlaConfig(
        **fla_model_fields(cfg, "MomForCausalLM"),
        num_heads=cfg.n_heads,
        head_dim=m.head_dim,
        expand_v=m.expand_v,
        conv_size=m.conv_size,
        use_output_gate=m.use_output_gate,
        use_short_conv=True,
        num_memories=m.num_memories,
        topk=m.top_k,
        capacity=1.0,
        use_layer_wise_balance=True,
        aux_loss_scale=m.aux_loss_coef,
        shared_mem=m.shared_memory,
        single_kv_proj=False,
        mom_backend="gated_deltanet",
    )


def from_hf_config(hf: PretrainedConfig) -> ModelConfig:
    """fla's MomConfig (or its config.json fields) as our model config."""
    if getattr(hf, "single_kv_proj", False) or not getattr(hf, "use_short_conv", True) or getattr(hf, "attn", None):
        raise ValueError("MoM checkpoints with single_kv_proj, without short convolutions or with hybrid "
                         "attention layers have no counterpart here")
    hidden = hf.intermediate_size or fla_mlp_hidden(hf.hidden_size, hf.hidden_ratio)
    return ModelConfig(
        vocab_size=hf.vocab_size,
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_heads,
        mixer="mom",
        ffn_hidden=hidden,
        norm_eps=hf.norm_eps,
        tie_embeddings=hf.tie_word_embeddings,
        init_std=hf.initializer_range,
        max_seq_len=hf.max_position_embeddings,
        mom=MoMConfig(
            num_memories=hf.num_memories,
            top_k=hf.topk,
            shared_memory=hf.shared_mem,
            aux_loss_coef=hf.aux_loss_scale,
            head_dim=hf.head_dim,
            expand_v=hf.expand_v,
            conv_size=hf.conv_size,
            use_output_gate=hf.use_output_gate,
        ),
    )


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state_dict with fla's keys."""
    return to_fla(state)


def from_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """fla's MoM state_dict with our keys (the LM head restored from the embedding if tied)."""
    return from_fla(state, cfg.tie_embeddings)
