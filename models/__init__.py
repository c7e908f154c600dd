"""Causal language models: one LM, one residual block, many token mixers (one file per family)."""

from models.config import ModelConfig
from models.lm import CausalLM, count_parameters

__all__ = ["CausalLM", "ModelConfig", "count_parameters"]
