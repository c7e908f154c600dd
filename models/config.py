"""The `model:` section of a run config: shape of the causal LM and one sub-section per mixer family.

Every field carries its documentation; validation lives next to the field it checks, so a wrong value
stops with a message naming the key and the fix before any process starts.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mixer_kernels.attention.dispatch import FLASH_MAX_HEAD_DIM
from mixer_kernels.causal_conv1d.dispatch import WIDTHS as CONV_WIDTHS
from mixer_kernels.delta_rule.dispatch import TRITON_CHUNK_SIZES as DELTA_RULE_CHUNKS
from mixer_kernels.delta_rule.dispatch import TRITON_MAX_KEY_DIM as DELTA_RULE_MAX_KEY
from mixer_kernels.gla.dispatch import TRITON_CHUNK_SIZES as GLA_CHUNKS
from mixer_kernels.gla.dispatch import TRITON_MAX_KEY_DIM as GLA_MAX_KEY
from mixer_kernels.mlstm.dispatch import TRITON_CHUNK_SIZES as MLSTM_CHUNKS
from mixer_kernels.selective_scan.dispatch import MAX_D_STATE as SCAN_MAX_D_STATE

# One letter per mixer family, as in Megatron's hybrid layer pattern. Families land one by one;
# a letter appears here when its mixer exists in models/mixers/.
PATTERN_LETTERS = {
    "A": "attention",
    "X": "mlstm",
    "M": "mamba",
    "m": "mamba2",
    "H": "hgrn2",
    "R": "mom",  # routed memories
    "G": "gated_deltanet",  # Megatron's letter
    # Hybrids (BST, SCOUT) and their windowed-attention part.
    "W": "sliding_window",
    "B": "bst",
    "S": "scout",
}


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# What the GPU fast paths take, checked here so that a config that validates runs on both devices.
def gpu_choice(key: str, value, allowed, path: str):
    """A value the fast path takes, or a ValueError naming the key, the allowed values and the path."""
    if value is not None and value not in allowed:
        raise ValueError(f"{key}={value}: {path} (the GPU path) takes {', '.join(map(str, allowed))}; choose one "
                         "of those (the CPU path would accept it, a GPU run would not)")
    return value


def gpu_at_most(key: str, value: int, limit: int, path: str) -> int:
    if value > limit:
        raise ValueError(f"{key}={value}: {path} (the GPU path) takes at most {limit}; lower {key}")
    return value


class AttentionConfig(Section):
    """Causal softmax attention (Llama style): RoPE, grouped-query heads, KV-cache decoding."""

    n_kv_heads: int | None = Field(None, gt=0, description="Key/value heads (GQA); None means n_heads.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency.")


class MLSTMConfig(Section):
    """mLSTM of xLSTM-7B (Beck et al., 2025; NX-AI's xLSTMLargeConfig): matrix memory, exponential gates."""

    qk_dim_factor: float = Field(0.5, gt=0, description="Query/key width as a multiple of d_model.")
    v_dim_factor: float = Field(1.0, gt=0, description="Value (and output gate) width as a multiple of d_model.")
    gate_soft_cap: float = Field(15.0, gt=0, description="cap * tanh(x / cap) on the gate pre-activations.")
    chunk_size: int = Field(64, gt=0, description="Tokens per chunk of the chunkwise kernel (speed only): "
                            "16, 32, 64 or 128, what the Triton kernel takes.")
    eps: float = Field(1e-6, gt=0, description="Added to the mLSTM normaliser |q.n| before dividing.")
    igate_bias_init: float = Field(-10.0, description="Input-gate bias at init: small writes early on.")
    fgate_bias_init: tuple[float, float] = Field(
        (3.0, 6.0), description="Forget-gate biases at init, spaced linearly over heads from first to last."
    )

    @field_validator("chunk_size")
    @classmethod
    def _kernel_chunk(cls, v: int) -> int:
        return gpu_choice("mlstm.chunk_size", v, MLSTM_CHUNKS, "the Triton mLSTM kernel")


class MambaConfig(Section):
    """Mamba-1 selective SSM (Gu & Dao, 2023), laid out as transformers' `MambaMixer` (mamba-ssm's `Mamba`).

    Reads no `model.n_heads` (Mamba-1 has no heads; the shipped configs set it to 1).
    """

    d_state: int = Field(16, gt=0, description="SSM state size N per inner channel (mamba-ssm: at most 256).")
    d_conv: int = Field(4, gt=1, description="Width of the depthwise causal convolution (causal-conv1d: 2 to 4).")
    expand: int = Field(2, gt=0, description="Inner width d_inner = expand * d_model.")
    dt_rank: int | None = Field(None, gt=0, description="Rank of the dt projection; None: ceil(d_model/16).")
    dt_min: float = Field(0.001, gt=0, description="Smallest dt at init (log-uniform in [dt_min, dt_max]).")
    dt_max: float = Field(0.1, gt=0, description="Largest step size dt at init.")
    dt_init_floor: float = Field(1e-4, gt=0, description="Initial dt values are clamped to at least this.")
    dt_scale: float = Field(1.0, gt=0, description="dt_proj weights start in +-dt_scale / sqrt(dt_rank).")
    conv_bias: bool = Field(True, description="Bias in the causal convolution.")
    bias: bool = Field(False, description="Biases in in_proj and out_proj.")

    @model_validator(mode="after")
    def _dt_range(self):
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_min={self.dt_min} exceeds dt_max={self.dt_max}")
        gpu_choice("mamba.d_conv", self.d_conv, CONV_WIDTHS, "causal-conv1d")
        gpu_at_most("mamba.d_state", self.d_state, SCAN_MAX_D_STATE, "mamba-ssm's selective scan")
        return self


class Mamba2Config(Section):
    """Mamba-2 / SSD (Dao & Gu, 2024), laid out as transformers' `Mamba2Mixer` (mamba-ssm's `Mamba2`).

    Heads are expand * d_model / headdim; `model.n_heads` is not read (the shipped configs set it to that
    head count, the number a sequence-parallel split divides).
    """

    d_state: int = Field(128, gt=0, description="SSM state size N per head channel.")
    d_conv: int = Field(4, gt=1, description="Width of the depthwise causal convolution over x, B and C "
                        "(causal-conv1d: 2 to 4).")
    expand: int = Field(2, gt=0, description="Inner width d_inner = expand * d_model.")
    headdim: int = Field(64, gt=0, description="Channels per SSD head P; heads = d_inner / headdim.")
    n_groups: int = Field(1, gt=0, description="Groups sharing B and C (like GQA's key/value groups).")
    chunk_size: int = Field(256, gt=0, description="Steps per chunk of the chunked scan (speed only).")
    A_init_range: tuple[float, float] = Field(
        (1.0, 16.0), description="Per-head decay rates -A start uniform in this range (A = -exp(A_log))."
    )
    dt_min: float = Field(0.001, gt=0, description="Smallest dt at init (log-uniform in [dt_min, dt_max]).")
    dt_max: float = Field(0.1, gt=0, description="Largest step size dt at init.")
    dt_init_floor: float = Field(1e-4, gt=0, description="Initial dt values are clamped to at least this.")
    dt_limit: tuple[float, float] | None = Field(
        None, description="Clamp softplus(dt) into (lo, hi) in training and decoding; None = no clamp."
    )
    conv_bias: bool = Field(True, description="Bias in the causal convolution.")
    bias: bool = Field(False, description="Biases in in_proj and out_proj.")

    @model_validator(mode="after")
    def _ranges(self):
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_min={self.dt_min} exceeds dt_max={self.dt_max}")
        if not 0 < self.A_init_range[0] <= self.A_init_range[1]:
            raise ValueError(f"A_init_range={self.A_init_range} must be (lo, hi) with 0 < lo <= hi")
        gpu_choice("mamba2.d_conv", self.d_conv, CONV_WIDTHS, "causal-conv1d")
        return self


class HGRN2Config(Section):
    """HGRN2 (Qin et al., 2024; flash-linear-attention's HGRN2Attention): gated linear recurrence whose
    state is expanded by an outer product; heads = d_model / expand_ratio, so set model.n_heads to that."""

    expand_ratio: int = Field(128, gt=0, description="Forget/query width per head (state rows); fla: 128; the "
                              "Triton kernel takes at most 256.")
    use_lower_bound: bool = Field(
        True, description="Forget gates >= a learned bound that rises with depth (0 in the first HGRN2 layer)."
    )
    output_norm_eps: float = Field(
        1e-5, gt=0, description="Epsilon of the output RMSNorm (fla's fused rms_norm_linear default)."
    )
    chunk_size: int | None = Field(None, gt=0, description="Chunk of the GLA kernel: 16, what the Triton kernel "
                                   "takes; None = each path's default.")

    @model_validator(mode="after")
    def _kernel_limits(self) -> "HGRN2Config":
        gpu_choice("hgrn2.chunk_size", self.chunk_size, GLA_CHUNKS, "the Triton GLA kernel")
        gpu_at_most("hgrn2.expand_ratio", self.expand_ratio, GLA_MAX_KEY, "the Triton GLA kernel")
        return self


class MoMConfig(Section):
    """Mixture-of-Memories (Du et al., 2025; fla's MomAttention): a router sends each token to top_k of
    num_memories recurrent memories (each sees only its own tokens) plus an always-on shared memory."""

    num_memories: int = Field(4, gt=0, description="Routed memories per layer.")
    top_k: int = Field(2, gt=0, description="Memories each token is written to and read from.")
    shared_memory: bool = Field(True, description="Add a memory every token goes through (unweighted).")
    capacity_factor: float | None = Field(
        None, gt=0, description="None = no limit (fla). Else a memory takes at most "
        "ceil(factor * top_k * max_seq_len / num_memories) tokens per sequence, first come first served.",
    )
    aux_loss_coef: float = Field(0.01, ge=0, description="Weight of the load-balancing loss (mean over layers).")
    backend: str = Field("gated_delta_rule", description="Memory recurrence: 'gated_delta_rule' (fla) or 'gla'.")
    head_dim: int = Field(256, gt=0, description="Query/key width per head.")
    expand_v: float = Field(1.0, gt=0, description="Value width per head as a multiple of head_dim.")
    conv_size: int = Field(4, gt=1, description="Width of the short causal convolutions on q, k, v.")
    use_output_gate: bool = Field(True, description="Gate the normalised output with silu(g_proj(x)).")
    chunk_size: int | None = Field(None, gt=0, description="Chunk of the memory kernel: 16, what the Triton "
                                   "kernels take; None = each path's default.")

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        if v not in ("gated_delta_rule", "gla"):
            raise ValueError(f"mom.backend={v!r}; choose 'gated_delta_rule' or 'gla'")
        return v

    @model_validator(mode="after")
    def _top_k_fits(self) -> "MoMConfig":
        if self.top_k > self.num_memories:
            raise ValueError(f"mom.top_k={self.top_k} exceeds mom.num_memories={self.num_memories}")
        if self.head_dim * self.expand_v != int(self.head_dim * self.expand_v):
            raise ValueError(f"mom.head_dim * mom.expand_v = {self.head_dim * self.expand_v} is not an integer")
        kernel = "the Triton gated delta rule kernel" if self.backend == "gated_delta_rule" else "the Triton GLA kernel"
        gpu_choice("mom.chunk_size", self.chunk_size, DELTA_RULE_CHUNKS if self.backend == "gated_delta_rule"
                   else GLA_CHUNKS, kernel)
        gpu_at_most("mom.head_dim", self.head_dim, DELTA_RULE_MAX_KEY if self.backend == "gated_delta_rule"
                    else GLA_MAX_KEY, kernel)
        return self


class GatedDeltaNetConfig(Section):
    """Gated DeltaNet (`G`; Yang et al., 2024; flash-linear-attention's GatedDeltaNet layer): short
    convolutions on q, k, v, the gated delta rule with a per-head decay, a gated RMSNorm on the output.
    Its heads are its own (`n_heads`), so a hybrid's attention layers keep `model.n_heads`."""

    n_heads: int | None = Field(None, gt=0, description="Query/key heads; None = model.n_heads (fla: num_heads).")
    n_v_heads: int | None = Field(None, gt=0, description="Value heads, a multiple of n_heads (fla's GVA: "
                                  "each query/key head serves n_v_heads / n_heads of them); None = n_heads.")
    head_dim: int = Field(256, gt=0, description="Query/key width per head (the state's rows); the Triton "
                          "kernel takes at most 256.")
    expand_v: float = Field(2.0, gt=0, description="Value width per head as a multiple of head_dim.")
    conv_size: int = Field(4, gt=1, description="Width of the short causal convolutions on q, k, v "
                           "(causal-conv1d: 2 to 4).")
    use_output_gate: bool = Field(True, description="Gate the normalised output with silu(g_proj(x)).")
    allow_neg_eigval: bool = Field(False, description="beta = 2 sigmoid(b) in [0, 2): negative eigenvalues "
                                   "of the state transition (Grazzi et al., 2024).")
    chunk_size: int | None = Field(None, gt=0, description="Chunk of the delta-rule kernel: 16, what the "
                                   "Triton kernel takes; None = each path's default.")

    @model_validator(mode="after")
    def _shapes(self) -> "GatedDeltaNetConfig":
        if self.head_dim * self.expand_v != int(self.head_dim * self.expand_v):
            raise ValueError(f"gated_deltanet.head_dim * expand_v = {self.head_dim * self.expand_v} is not an "
                             "integer; choose expand_v so that the value width per head is whole")
        gpu_choice("gated_deltanet.conv_size", self.conv_size, CONV_WIDTHS, "causal-conv1d")
        gpu_choice("gated_deltanet.chunk_size", self.chunk_size, DELTA_RULE_CHUNKS,
                   "the Triton gated delta rule kernel")
        gpu_at_most("gated_deltanet.head_dim", self.head_dim, DELTA_RULE_MAX_KEY, "the Triton gated delta rule kernel")
        return self


class SlidingWindowConfig(Section):
    """Sliding-window attention (`W`): the attention mixer's projections and RoPE (`model.attention`), each
    query reading only the last `window` positions; decoding keeps a KV cache of window - 1 tokens."""

    window: int = Field(512, gt=0, description="Positions a query reads, itself included (flash-attn "
                        "window_size=(window - 1, 0)).")


class BSTConfig(Section):
    """Block-State Transformer (`B`; Fathi et al., 2023): an S4D-style diagonal SSM over the whole sequence
    gives context states; each block of `block_size` tokens attends causally to itself and to the context
    states of the tokens before it (models/mixers/bst.py). Attention heads are `model.n_heads` and
    `model.attention` (n_kv_heads, rope_theta)."""

    block_size: int = Field(128, gt=0, description="Tokens per block W; attention is causal inside a block.")
    context: Literal["single_head", "multi_head", "multi_filter"] = Field(
        "multi_filter", description="Context states of the paper: single_head (SH, the previous block's W "
        "SSM outputs), multi_head (MH, the last SSM output mapped to S states), multi_filter (MF, the last "
        "outputs of S SSM filters).",
    )
    n_context_states: int = Field(32, gt=0, description="S, context states per block for multi_head and "
                                  "multi_filter (single_head uses block_size).")
    d_state: int = Field(16, gt=0, description="State size N per channel of the diagonal SSM.")
    dt_min: float = Field(0.001, gt=0, description="Smallest SSM step size at init (log-uniform to dt_max).")
    dt_max: float = Field(0.1, gt=0, description="Largest SSM step size at init.")

    @model_validator(mode="after")
    def _dt_range(self):
        if self.dt_min > self.dt_max:
            raise ValueError(f"bst.dt_min={self.dt_min} exceeds bst.dt_max={self.dt_max}")
        return self


class SCOUTConfig(Section):
    """SCOUT (`S`; Jafari et al., 2025): a local mixer enriches each token; each segment of `segment_size`
    tokens leaves one checkpoint (the local mixer's output at its end); each token attends to itself and
    the checkpoints of earlier segments (models/mixers/scout.py). Attention reads `model.n_heads` and
    `model.attention`."""

    segment_size: int = Field(64, gt=0, description="Tokens per segment S; attention costs T * T / S.")
    local_mixer: Literal["mamba2", "mamba", "sliding_window"] = Field(
        "mamba2", description="Local mixer; it reads its own section (model.mamba2, model.mamba or "
        "model.sliding_window).",
    )


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
    loss_chunk_tokens: int = Field(1024, gt=0, description="Tokens per chunk of the LM head + loss in training "
                                   "(models/chunked_loss.py; memory only: at most (chunk, vocab) fp32 logits live).")
    attention: AttentionConfig = Field(default_factory=AttentionConfig)
    mlstm: MLSTMConfig = Field(default_factory=MLSTMConfig)
    mamba: MambaConfig = Field(default_factory=MambaConfig)
    mamba2: Mamba2Config = Field(default_factory=Mamba2Config)
    hgrn2: HGRN2Config = Field(default_factory=HGRN2Config)
    mom: MoMConfig = Field(default_factory=MoMConfig)
    gated_deltanet: GatedDeltaNetConfig = Field(default_factory=GatedDeltaNetConfig)
    sliding_window: SlidingWindowConfig = Field(default_factory=SlidingWindowConfig)
    bst: BSTConfig = Field(default_factory=BSTConfig)
    scout: SCOUTConfig = Field(default_factory=SCOUTConfig)

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
        # Gated DeltaNet sizes its heads by gated_deltanet.head_dim (fla's 6 heads of 256 at d_model 2048): a
        # model of G layers only has no d_model / n_heads head size to check.
        if self.d_model % self.n_heads and set(self.layer_mixers()) != {"gated_deltanet"}:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.pattern and self.n_layers % len(self.pattern):
            raise ValueError(
                f"n_layers={self.n_layers} is not a multiple of len(pattern)={len(self.pattern)} "
                f"({self.pattern!r}); change n_layers or the pattern"
            )
        if "hgrn2" in self.layer_mixers() and self.n_heads * self.hgrn2.expand_ratio != self.d_model:
            raise ValueError(
                f"HGRN2 has d_model / hgrn2.expand_ratio heads: set model.n_heads={self.d_model // self.hgrn2.expand_ratio}"
                f" (or hgrn2.expand_ratio={self.d_model // self.n_heads}) for d_model={self.d_model}"
            )
        attends = {"attention", "sliding_window", "bst", "scout"} & set(self.layer_mixers())
        if attends:
            gpu_at_most(f"model.d_model / model.n_heads (the head size of the {sorted(attends)} layers)",
                        self.head_dim, FLASH_MAX_HEAD_DIM, "flash-attn")
        gdn = self.gated_deltanet
        if "gated_deltanet" in self.layer_mixers() and gdn.n_v_heads and gdn.n_v_heads % (gdn.n_heads or self.n_heads):
            raise ValueError(f"gated_deltanet.n_v_heads={gdn.n_v_heads} is not a multiple of the query/key heads "
                             f"{gdn.n_heads or self.n_heads} (gated_deltanet.n_heads, else model.n_heads)")
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
