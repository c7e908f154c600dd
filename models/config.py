"""The `model:` section of a run config: shape of the causal LM and one sub-section per mixer family.

Every field carries its documentation; validation lives next to the field it checks, so a wrong value
stops with a message naming the key and the fix before any process starts.
"""

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# One letter per mixer family, as in Megatron's hybrid layer pattern. Families land one by one;
# a letter appears here when its mixer exists in models/mixers/.
PATTERN_LETTERS = {
    "A": "attention",
}


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AttentionConfig(Section):
    """Causal softmax attention (Llama style): RoPE, grouped-query heads, KV-cache decoding."""

    n_kv_heads: int | None = Field(None, gt=0, description="Key/value heads (GQA); None means n_heads.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency.")


class ModelConfig(Section):
    vocab_size: int = Field(gt=0, description="Embedding rows; the tokenizer's vocabulary must fit in it.")
    d_model: int = Field(gt=0, description="Residual stream width.")
    n_layers: int = Field(gt=0, description="Number of residual blocks.")
    n_heads: int = Field(gt=0, description="Heads of the token mixer (attention heads, mLSTM heads, ...).")
    mixer: str = Field("attention", description="Token mixer of every layer, unless `pattern` is given.")
    pattern: str | None = Field(
        None, description="Hybrid layer pattern, one letter per layer repeated to n_layers, e.g. 'MMMA'."
    )
    ffn_hidden: int | None = Field(
        None, ge=0, description="SwiGLU hidden size; None derives it from ffn_multiplier; 0 means no FFN."
    )
    ffn_multiplier: float = Field(8 / 3, gt=0, description="SwiGLU hidden size as a multiple of d_model.")
    ffn_multiple_of: int = Field(64, gt=0, description="Round the derived SwiGLU hidden size up to this.")
    norm_eps: float = Field(1e-6, gt=0, description="RMSNorm epsilon.")
    tie_embeddings: bool = Field(False, description="Share the input embedding with the LM head.")
    logits_soft_cap: float | None = Field(None, gt=0, description="cap * tanh(logits / cap); None = off.")
    init_std: float = Field(0.02, gt=0, description="Std of the normal init of linear and embedding weights.")
    max_seq_len: int = Field(2048, gt=0, description="Longest sequence the model is trained or evaluated on.")
    activation_checkpointing: bool = Field(False, description="Recompute each block in the backward pass.")
    attention: AttentionConfig = Field(default_factory=AttentionConfig)

    @field_validator("mixer")
    @classmethod
    def _known_mixer(cls, v: str) -> str:
        if v not in PATTERN_LETTERS.values():
            raise ValueError(f"unknown mixer {v!r}; choose one of {sorted(set(PATTERN_LETTERS.values()))}")
        return v

    @field_validator("pattern")
    @classmethod
    def _known_letters(cls, v: str | None) -> str | None:
        if v is None:
            return v
        unknown = sorted(set(v) - set(PATTERN_LETTERS))
        if not v or unknown:
            raise ValueError(f"unknown layer letters {unknown or v!r}; known: {PATTERN_LETTERS}")
        return v

    @model_validator(mode="after")
    def _shapes_fit(self) -> "ModelConfig":
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.pattern and self.n_layers % len(self.pattern):
            raise ValueError(
                f"n_layers={self.n_layers} is not a multiple of len(pattern)={len(self.pattern)} "
                f"({self.pattern!r}); change n_layers or the pattern"
            )
        kv = self.attention.n_kv_heads
        if kv is not None and self.n_heads % kv:
            raise ValueError(f"model.n_heads={self.n_heads} is not divisible by attention.n_kv_heads={kv}")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_hidden_size(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = int(self.ffn_multiplier * self.d_model)
        return -(-hidden // self.ffn_multiple_of) * self.ffn_multiple_of

    def layer_mixers(self) -> list[str]:
        """The mixer name of each layer, from `pattern` if given, else `mixer` everywhere."""
        if self.pattern is None:
            return [self.mixer] * self.n_layers
        return [PATTERN_LETTERS[c] for c in self.pattern * (self.n_layers // len(self.pattern))]
