"""Gated DeltaNet <-> flash-linear-attention's `GatedDeltaNetForCausalLM` (model_type "gated_deltanet").

Owns the config map (ModelConfig <-> fla's GatedDeltaNetConfig fields) and the state_dict key map, both
ways. A hybrid of Gated DeltaNet and attention layers (pattern letters G and A, e.g. the 3:1 'GGGA') is the
same fla class: its `attn` field names the attention layers (`{layers: [...], num_heads, num_kv_heads,
rope_theta}`), and fla's `Attention` has our attention mixer's q/k/v/o_proj and RoPE (rotate-half, the same
inverse frequencies). Every tensor maps one to one, unchanged (models/hf/fla_layout.py). What fla's class
cannot express is refused by name: other letters, a logit soft cap, blocks without an MLP.

fla is not imported here (importing it re-registers transformers' mamba / mamba2 Auto classes): the
exported config is a plain `PretrainedConfig` carrying fla's fields and model_type, which fla's
GatedDeltaNetConfig reads. Loading the folder with `AutoModelForCausalLM` needs `import fla` first.
"""

import torch
from transformers import PretrainedConfig

from models.config import GatedDeltaNetConfig, ModelConfig
from models.hf.fla_layout import fla_mlp_hidden, fla_model_fields, from_fla, to_fla

MODEL_TYPE = "gated_deltanet"
HYBRID_WITH_ATTENTION = True  # models/hf/export.py: G layers mixed with A layers export here too


class _FlaConfig(PretrainedConfig):
    """A config.json writer for fla's GatedDeltaNetConfig fields (model_type "gated_deltanet")."""

    model_type = MODEL_TYPE


def to_hf_config(cfg: ModelConfig) -> PretrainedConfig:
    """Our model config as fla's GatedDeltaNetConfig fields (fla's fused GPU kernels on, its defaults)."""
    mixers = cfg.layer_mixers()
    if "gated_deltanet" not in mixers or not set(mixers) <= {"gated_deltanet", "attention"}:
        raise ValueError(f"fla's GatedDeltaNetForCausalLM has Gated DeltaNet layers and optionally attention "
                         f"layers (pattern letters G and A); this model has {sorted(set(mixers))}")
    g = cfg.gated_deltanet
    attention_layers = [i for i, name in enumerate(mixers) if name == "attention"]
    attn = None
    if attention_layers:
        attn = {"layers": attention_layers, "num_heads": cfg.n_heads,
                "num_kv_heads": cfg.attention.n_kv_heads or cfg.n_heads, "qkv_bias": False, "window_size": None,
                "rope_theta": cfg.attention.rope_theta}
    heads = g.n_heads or cfg.n_heads
    return _FlaConfig(
        **fla_model_fields(cfg, "GatedDeltaNetForCausalLM"),
        num_heads=heads,
        num_v_heads=None if (g.n_v_heads or heads) == heads else g.n_v_heads,
        head_dim=g.head_dim,
        expand_v=g.expand_v,
        use_gate=g.use_output_gate,
        use_short_conv=True,
        allow_neg_eigval=g.allow_neg_eigval,
        conv_size=g.conv_size,
        output_gate_activation="swish",
        attn=attn,
    )


def _pattern(letters: list[str]) -> str:
    """The shortest unit that repeats to the layer list ('GGGAGGGA' -> 'GGGA')."""
    n = len(letters)
    for size in range(1, n + 1):
        if n % size == 0 and letters == letters[:size] * (n // size):
            return "".join(letters[:size])
    raise AssertionError("unreachable: the whole list repeats once")


def from_hf_config(hf: PretrainedConfig) -> ModelConfig:
    """fla's GatedDeltaNetConfig (or its config.json fields) as our model config."""
    if not getattr(hf, "use_short_conv", True) or getattr(hf, "output_gate_activation", "swish") == "sigmoid":
        raise ValueError("Gated DeltaNet checkpoints without short convolutions or with a sigmoid output gate "
                         "have no counterpart here")
    if getattr(hf, "attnres_block_size", None) is not None:
        raise ValueError("Gated DeltaNet checkpoints with attention residuals (attnres_block_size) have no "
                         "counterpart here")
    attn = getattr(hf, "attn", None)
    specs = [] if attn is None else [attn] if isinstance(attn, dict) else list(attn)
    if len(specs) > 1 or any(s.get("qkv_bias") or s.get("window_size") for s in specs):
        raise ValueError("Gated DeltaNet hybrids map here with one kind of attention layer (no qkv bias, no "
                         f"window); this checkpoint has attn={attn}")
    layers = set(specs[0]["layers"]) if specs else set()
    letters = ["A" if i in layers else "G" for i in range(hf.num_hidden_layers)]
    heads = hf.num_heads
    hybrid = dict(pattern=_pattern(letters), n_heads=specs[0]["num_heads"],
                  attention=dict(n_kv_heads=specs[0].get("num_kv_heads"),
                                 rope_theta=specs[0].get("rope_theta", 10000.0))) if specs else {}
    return ModelConfig(
        vocab_size=hf.vocab_size,
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        **({"n_heads": heads, "mixer": "gated_deltanet"} | hybrid),
        ffn_hidden=hf.intermediate_size or fla_mlp_hidden(hf.hidden_size, hf.hidden_ratio),
        norm_eps=hf.norm_eps,
        tie_embeddings=hf.tie_word_embeddings,
        init_std=hf.initializer_range,
        max_seq_len=hf.max_position_embeddings,
        gated_deltanet=GatedDeltaNetConfig(
            n_heads=heads if specs else None,
            n_v_heads=getattr(hf, "num_v_heads", None),
            head_dim=hf.head_dim,
            expand_v=hf.expand_v,
            conv_size=hf.conv_size,
            use_output_gate=hf.use_gate,
            allow_neg_eigval=hf.allow_neg_eigval,
        ),
    )


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state_dict with fla's keys."""
    return to_fla(state)


def from_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """fla's Gated DeltaNet state_dict with our keys (the LM head restored from the embedding if tied)."""
    return from_fla(state, cfg.tie_embeddings)
