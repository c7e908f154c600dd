"""Gated DeltaNet <-> flash-linear-attention's `GatedDeltaNetForCausalLM` (model_type "gated_deltanet").

Owns the config map (ModelConfig <-> fla's GatedDeltaNetConfig fields) and the state_dict key map, both
ways. A hybrid of Gated DeltaNet with attention and sliding-window layers (pattern letters G, A and W, e.g.
the 3:1 'GGGA', or Gated DeltaNet-H1's SWA layers) is the same fla class: its `attn` field names the attention
layers (`{layers: [...], num_heads, num_kv_heads, window_size, rope_theta}`, one spec per kind), and fla's
`Attention` has our attention mixer's q/k/v/o_proj and RoPE (rotate-half, the same inverse frequencies). Every tensor maps one to one, unchanged (models/hf/fla_layout.py). What fla's class
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


class _FlaConfig(PretrainedConfig):
    """A config.json writer for fla's GatedDeltaNetConfig fields (model_type "gated_deltanet")."""

    model_type = MODEL_TYPE


# Attention mixers fla's `attn` specs express: mixer -> its window (None: full causal attention). G layers
# mixed with these export here too (models/hf/export.py reads ATTENTION_MIXERS).
WINDOWS = {"attention": lambda cfg: None, "sliding_window": lambda cfg: cfg.sliding_window.window}
ATTENTION_MIXERS = frozenset(WINDOWS)


def to_hf_config(cfg: ModelConfig) -> PretrainedConfig:
    """Our model config as fla's GatedDeltaNetConfig fields (fla's fused GPU kernels on, its defaults)."""
    mixers = cfg.layer_mixers()
    if "gated_deltanet" not in mixers or not set(mixers) <= {"gated_deltanet", *WINDOWS}:
        raise ValueError(f"fla's GatedDeltaNetForCausalLM has Gated DeltaNet layers and optionally attention "
                         f"and sliding-window layers (pattern letters G, A and W); this model has "
                         f"{sorted(set(mixers))}")
    g = cfg.gated_deltanet
    # One fla `attn` spec per kind of attention layer; a window of `window` positions is flash-attn's
    # window_size=(window - 1, 0) in both.
    specs = [{"layers": layers, "num_heads": cfg.n_heads, "num_kv_heads": cfg.attention.n_kv_heads or cfg.n_heads,
              "qkv_bias": False, "window_size": window(cfg), "rope_theta": cfg.attention.rope_theta}
             for name, window in WINDOWS.items() if (layers := [i for i, m in enumerate(mixers) if m == name])]
    attn = None if not specs else specs[0] if len(specs) == 1 else specs
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
    full = [s for s in specs if not s.get("window_size")]
    windowed = [s for s in specs if s.get("window_size")]
    shared = {(s["num_heads"], s.get("num_kv_heads"), s.get("rope_theta", 10000.0)) for s in specs}
    if len(full) > 1 or len(windowed) > 1 or len(shared) > 1 or any(s.get("qkv_bias") for s in specs):
        raise ValueError("Gated DeltaNet hybrids map here with at most one full and one sliding-window attention "
                         "spec sharing heads, KV heads and RoPE base, without qkv bias; this checkpoint has "
                         f"attn={attn}")
    letters = ["G"] * hf.num_hidden_layers
    for spec in specs:
        for i in spec["layers"]:
            letters[i] = "W" if spec.get("window_size") else "A"
    heads = hf.num_heads
    hybrid = {}
    if specs:
        n_heads, n_kv_heads, rope_theta = shared.pop()
        hybrid = dict(pattern=_pattern(letters), n_heads=n_heads,
                      attention=dict(n_kv_heads=n_kv_heads, rope_theta=rope_theta))
        if windowed:
            hybrid["sliding_window"] = dict(window=windowed[0]["window_size"])
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
