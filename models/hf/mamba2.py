"""Mamba-2 <-> transformers' native `Mamba2ForCausalLM` (model_type "mamba2").

Owns the config map (ModelConfig <-> `Mamba2Config`). The state_dict key map is Mamba-1's
(models/hf/mamba.py): same block layout, x + mixer(norm(x)) with no FFN, mixer parameters under the same
names. transformers' `time_step_limit` (0, inf) is our `mamba2.dt_limit: null`; config.json files that
spell the infinity in either transformers style are read by models/hf/config_json.py.
"""

import math

from transformers import Mamba2Config as HFMamba2Config

from models.config import Mamba2Config, ModelConfig
from models.hf.mamba import check_exportable, from_hf_state_dict, n_heads_field, to_hf_state_dict

MODEL_TYPE = "mamba2"

__all__ = ["MODEL_TYPE", "from_hf_config", "from_hf_state_dict", "to_hf_config", "to_hf_state_dict"]


def to_hf_config(cfg: ModelConfig) -> HFMamba2Config:
    check_exportable(cfg, "mamba2", "Mamba2ForCausalLM")
    m = cfg.mamba2
    return HFMamba2Config(
        num_heads=m.expand * cfg.d_model // m.headdim,
        head_dim=m.headdim,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        state_size=m.d_state,
        num_hidden_layers=cfg.n_layers,
        layer_norm_epsilon=cfg.norm_eps,
        expand=m.expand,
        conv_kernel=m.d_conv,
        n_groups=m.n_groups,
        use_bias=m.bias,
        use_conv_bias=m.conv_bias,
        time_step_min=m.dt_min,
        time_step_max=m.dt_max,
        time_step_floor=m.dt_init_floor,
        time_step_limit=m.dt_limit or (0.0, math.inf),
        chunk_size=m.chunk_size,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def from_hf_config(hf: HFMamba2Config, max_seq_len: int = 2048) -> ModelConfig:
    """transformers' Mamba2Config as our model config (max_seq_len is ours only)."""
    if hf.hidden_act != "silu" or hf.expand * hf.hidden_size != hf.num_heads * hf.head_dim:
        raise ValueError(
            "only Mamba-2 configs with hidden_act='silu' and num_heads * head_dim = expand * hidden_size map "
            f"to ours, got {hf.hidden_act!r}, {hf.num_heads} * {hf.head_dim} against "
            f"{hf.expand} * {hf.hidden_size}"
        )
    lo, hi = (float(v) for v in hf.time_step_limit)
    return ModelConfig(
        vocab_size=hf.vocab_size,
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=n_heads_field(hf.hidden_size, hf.num_heads),
        mixer="mamba2",
        ffn_hidden=0,
        norm_eps=hf.layer_norm_epsilon,
        tie_embeddings=hf.tie_word_embeddings,
        max_seq_len=max_seq_len,
        mamba2=Mamba2Config(
            d_state=hf.state_size,
            d_conv=hf.conv_kernel,
            expand=hf.expand,
            headdim=hf.head_dim,
            n_groups=hf.n_groups,
            chunk_size=hf.chunk_size,
            dt_min=hf.time_step_min,
            dt_max=hf.time_step_max,
            dt_init_floor=hf.time_step_floor,
            dt_limit=None if (lo, hi) == (0.0, math.inf) else (lo, hi),
            conv_bias=hf.use_conv_bias,
            bias=hf.use_bias,
        ),
    )
