"""What flash-linear-attention's models share (HGRN2, MoM, Gated DeltaNet): the model-level config fields
and the state_dict layout, our keys <-> fla's.

fla's blocks are `model.layers.{i}` with `attn_norm`, `attn` (the token mixer, whatever its kind), `mlp_norm`
and a GatedMLP `mlp`; our mixers keep fla's parameter names, so every tensor maps one to one, unchanged.
"""

import torch

from models.config import ModelConfig


def fla_model_fields(cfg: ModelConfig, architecture: str) -> dict:
    """The config fields every fla causal LM has, from ours (fla's fused GPU kernels on, its defaults); raises
    ValueError naming the fix where fla's blocks cannot hold the model (they always have an MLP, no cap)."""
    family = architecture.removesuffix("ForCausalLM")
    if not cfg.ffn_hidden_size or cfg.logits_soft_cap is not None:
        raise ValueError(f"fla's {family} blocks always have an MLP and no logit soft cap: set model.ffn_hidden "
                         "to a positive size (or null) and model.logits_soft_cap: null to export")
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, attn_mode="chunk",
        hidden_ratio=4, intermediate_size=cfg.ffn_hidden_size, hidden_act="swish",
        max_position_embeddings=cfg.max_seq_len, norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std, fuse_norm=True, fuse_swiglu=True, fuse_cross_entropy=True,
        architectures=[architecture], bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )

TOP_KEYS = {
    "embed.weight": "model.embeddings.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
BLOCK_PREFIXES = {  # ours -> fla's, inside block i
    "mixer_norm.": "attn_norm.",
    "mixer.": "attn.",
    "ffn_norm.": "mlp_norm.",
    "ffn.gate.": "mlp.gate_proj.",
    "ffn.up.": "mlp.up_proj.",
    "ffn.down.": "mlp.down_proj.",
}


def _rename(key: str, top: dict[str, str], prefixes: dict[str, str], src: str, dst: str) -> str:
    if key in top:
        return top[key]
    if key.startswith(src):
        index, _, rest = key[len(src):].partition(".")
        for a, b in prefixes.items():
            if rest.startswith(a):
                return f"{dst}{index}.{b}{rest[len(a):]}"
    raise KeyError(f"no flash-linear-attention mapping for state_dict key {key!r}")


def to_fla(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state_dict with fla's keys."""
    return {_rename(k, TOP_KEYS, BLOCK_PREFIXES, "blocks.", "model.layers."): v for k, v in state.items()}


def from_fla(state: dict[str, torch.Tensor], tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """fla's state_dict with our keys (the LM head restored from the embedding if tied)."""
    top = {v: k for k, v in TOP_KEYS.items()}
    prefixes = {v: k for k, v in BLOCK_PREFIXES.items()}
    ours = {_rename(k, top, prefixes, "model.layers.", "blocks."): v for k, v in state.items()}
    if tie_embeddings:
        ours.setdefault("lm_head.weight", ours["embed.weight"])
    return ours


def fla_mlp_hidden(d_model: int, hidden_ratio: int | None) -> int:
    """fla's GatedMLP without intermediate_size: int(d_model * hidden_ratio * 2 / 3) rounded up to 256."""
    hidden = int(d_model * (hidden_ratio or 4) * 2 / 3)
    return 256 * ((hidden + 255) // 256)
