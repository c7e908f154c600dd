"""xLSTM <-> transformers' native `xLSTMForCausalLM` (model_type "xlstm", NX-AI's xLSTM-7B layout).

Owns the config map (ModelConfig <-> `xLSTMConfig`) and the state_dict key map, both directions.
The block structure is the same on both sides, so every tensor maps one to one, unchanged.
"""

import logging

import torch
from transformers import xLSTMConfig

from models.config import MLSTMConfig, ModelConfig

logger = logging.getLogger(__name__)

MODEL_TYPE = "xlstm"

# Our key -> transformers' key, outside the blocks and inside block i (prefixes "blocks.{i}." and
# "backbone.blocks.{i}.").
_TOP_KEYS = {
    "embed.weight": "backbone.embeddings.weight",
    "norm.weight": "backbone.out_norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_BLOCK_KEYS = {
    "mixer_norm.weight": "norm_mlstm.weight",
    "mixer.q_proj.weight": "mlstm_layer.q.weight",
    "mixer.k_proj.weight": "mlstm_layer.k.weight",
    "mixer.v_proj.weight": "mlstm_layer.v.weight",
    "mixer.o_gate.weight": "mlstm_layer.ogate_preact.weight",
    "mixer.i_gate.weight": "mlstm_layer.igate_preact.weight",
    "mixer.i_gate.bias": "mlstm_layer.igate_preact.bias",
    "mixer.f_gate.weight": "mlstm_layer.fgate_preact.weight",
    "mixer.f_gate.bias": "mlstm_layer.fgate_preact.bias",
    "mixer.head_norm.weight": "mlstm_layer.multihead_norm.weight",
    "mixer.out_proj.weight": "mlstm_layer.out_proj.weight",
    "ffn_norm.weight": "norm_ffn.weight",
    "ffn.gate.weight": "ffn.proj_up_gate.weight",
    "ffn.up.weight": "ffn.proj_up.weight",
    "ffn.down.weight": "ffn.proj_down.weight",
}


def _hf_ffn_hidden(d_model: int, factor: float, multiple_of: int) -> int:
    """transformers' `round_up_to_next_multiple_of(d_model * factor, multiple_of)`."""
    return int((d_model * factor + multiple_of - 1) // multiple_of * multiple_of)


def to_hf_config(cfg: ModelConfig) -> xLSTMConfig:
    """Our model config as transformers' xLSTMConfig, set to run its native PyTorch kernels."""
    if set(cfg.layer_mixers()) != {"mlstm"}:
        raise ValueError(f"transformers' xLSTM has mLSTM layers only; this model has {cfg.layer_mixers()}")
    hidden = _hf_ffn_hidden(cfg.d_model, cfg.ffn_multiplier, cfg.ffn_multiple_of)
    if cfg.ffn_hidden_size != hidden:
        raise ValueError(
            f"model.ffn_hidden={cfg.ffn_hidden} cannot be expressed in xLSTMConfig, which derives {hidden} "
            "from ffn_multiplier and ffn_multiple_of; set ffn_hidden: null"
        )
    if cfg.logits_soft_cap is None:
        raise ValueError("transformers' xLSTM always soft-caps the logits; set model.logits_soft_cap (xLSTM-7B: 30)")
    if cfg.d_model * cfg.mlstm.qk_dim_factor % 64:
        # transformers sizes its generation cache with q/k widths rounded up to 64 but its layers without.
        logger.warning(
            "d_model * qk_dim_factor = %s is not a multiple of 64: transformers' xLSTM loads and runs this "
            "model, but its generation cache (use_cache=True) has the wrong shape",
            cfg.d_model * cfg.mlstm.qk_dim_factor,
        )
    m = cfg.mlstm
    return xLSTMConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_heads=cfg.n_heads,
        use_bias=False,
        norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        add_out_norm=True,
        qk_dim_factor=m.qk_dim_factor,
        v_dim_factor=m.v_dim_factor,
        # Native PyTorch kernels and inference mode (any sequence length, returns states): what runs on
        # any machine; users switch to mlstm_kernels' Triton kernels in the config when they have them.
        chunkwise_kernel="chunkwise--native_autograd",
        sequence_kernel="native_sequence__native",
        step_kernel="native",
        mode="inference",
        chunk_size=m.chunk_size,
        return_last_states=True,
        eps=m.eps,
        inference_state_dtype="float32",
        ffn_proj_factor=cfg.ffn_multiplier,
        ffn_round_up_to_multiple_of=cfg.ffn_multiple_of,
        gate_soft_cap=m.gate_soft_cap,
        output_logit_soft_cap=cfg.logits_soft_cap,
        weight_mode="single",
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def from_hf_config(hf: xLSTMConfig, max_seq_len: int = 8192) -> ModelConfig:
    """transformers' xLSTMConfig as our model config (max_seq_len is ours only; xLSTM-7B trained at 8192)."""
    if hf.use_bias or not hf.add_out_norm or hf.weight_mode != "single":
        raise ValueError(
            "only xLSTM configs with use_bias=False, add_out_norm=True and weight_mode='single' map to ours, "
            f"got use_bias={hf.use_bias}, add_out_norm={hf.add_out_norm}, weight_mode={hf.weight_mode!r}"
        )
    return ModelConfig(
        vocab_size=hf.vocab_size,
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_heads,
        mixer="mlstm",
        ffn_multiplier=hf.ffn_proj_factor,
        ffn_multiple_of=hf.ffn_round_up_to_multiple_of,
        norm_eps=hf.norm_eps,
        tie_embeddings=hf.tie_word_embeddings,
        logits_soft_cap=hf.output_logit_soft_cap,
        max_seq_len=max_seq_len,
        mlstm=MLSTMConfig(
            qk_dim_factor=hf.qk_dim_factor,
            v_dim_factor=hf.v_dim_factor,
            gate_soft_cap=hf.gate_soft_cap,
            chunk_size=hf.chunk_size,
            eps=hf.eps,
        ),
    )


def _rename(key: str, top: dict[str, str], block: dict[str, str], src: str, dst: str) -> str:
    """Translate one key with the top-level and per-block maps; blocks are `{src}{i}.` -> `{dst}{i}.`."""
    if key in top:
        return top[key]
    if key.startswith(src):
        index, _, rest = key[len(src):].partition(".")
        if rest in block:
            return f"{dst}{index}.{block[rest]}"
    raise KeyError(f"no xLSTM mapping for state_dict key {key!r}")


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state_dict with transformers' keys.

    A tied LM head is written too: transformers 5.2x's xLSTMForCausalLM declares no tied weights, so it
    ignores tie_word_embeddings and would leave a missing lm_head.weight at its random init.
    """
    return {_rename(k, _TOP_KEYS, _BLOCK_KEYS, "blocks.", "backbone.blocks."): v for k, v in state.items()}


def from_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers' xLSTM state_dict with our keys (the LM head restored from the embedding if tied)."""
    top = {v: k for k, v in _TOP_KEYS.items()}
    block = {v: k for k, v in _BLOCK_KEYS.items()}
    ours = {_rename(k, top, block, "backbone.blocks.", "blocks."): v for k, v in state.items()}
    if cfg.tie_embeddings:
        ours.setdefault("lm_head.weight", ours["embed.weight"])
    return ours
