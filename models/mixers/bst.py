"""The Block-State Transformer mixer `bst` (letter `B`; Fathi et al., 2023, "Block-State Transformers").

Formulation implemented (per layer, on the normed input x of the block):

1. State-space sublayer. A diagonal SSM of the S4D-Real kind (Gu et al., 2022: per channel,
   h_t = a * h_{t-1} + b * x_t, y_t = sum_n C_n h_{t,n} + D x_t, a = exp(dt * A), A_n = -exp(A_log_n)
   starting at -(n + 1), b = (a - 1) / A from zero-order hold, B = 1) runs over the whole sequence. Training
   runs it as the paper does, as a long convolution by FFT, in blocks of FFT_BLOCK tokens whose states pass
   from block to block (linear in T; one FFT over the whole sequence cost log T per token); decoding runs
   its recurrence. We chose this over our Mamba-2 mixer because it is the paper's sublayer (an
   input-independent S4-style filter, parallel by FFT), because the multi-filter variant is just more
   filters per channel, and because its state is one (channels x N) tensor. Real rather than complex
   (S4D-Lin) so parameters, state and the exported model stay real-valued.
2. Context states. The sequence is cut into blocks of W tokens; block i reads context states computed
   from SSM outputs at positions < i * W only, so causality is exact (each SSM output y_t depends on
   tokens <= t). The three variants of the paper, `bst.context`:
   - `single_head` (SH): the W SSM outputs of the previous block, (i-1)W .. iW - 1;
   - `multi_head` (MH): the SSM output at position iW - 1, mapped by one linear layer to S states;
   - `multi_filter` (MF): S SSM filters per channel (S times the channels); their S outputs at
     position iW - 1 are the S states.
   Context states go through a GELU (the S4 block's nonlinearity) and their own key/value projections.
   Block 0 reads the SSM's output for an all-zero prefix, i.e. zero states (zero keys and values): every
   block then has the same shape and runs in one batched attention call.
3. Block transformer. Each token attends, in one softmax, to its block's context states and causally to
   the earlier tokens of its own block (RoPE at in-block positions; context keys carry no position).
   That is causal attention with the context states as a key prefix: `attention(q, [ctx; k], [ctx; v],
   q_offset=S)`, flash-attn on GPU, SDPA on CPU.

Decoding state (bounded): the SSM state, the current block's context keys/values, the keys/values of the
current block's tokens so far, and (SH only) the SSM outputs of the current block that become the next
block's context.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mixer_kernels.attention import attention
from models.config import ModelConfig
from models.documents import per_document
from models.flops import linear
from models.mixers.attention import AttentionMixer, KVCache
from models.mixers.mamba import exclude_from_weight_decay

FFT_BLOCK = 512  # tokens per FFT convolution; longer sequences pass the SSM state from block to block

# The helpers below keep channels first, (C, B, T): every contraction over the state is then a bmm over
# channels on contiguous operands (transposed ones send CPU bmm, and its backward, down a per-matrix path).


def _powers(dtA: torch.Tensor, t: int, first: int = 0) -> torch.Tensor:
    """a^s = exp(dtA s) for s = first .. first + t - 1: (C, N, t)."""
    return torch.exp(dtA[..., None] * torch.arange(first, first + t, device=dtA.device))


def _fft_run(x: torch.Tensor, dtA: torch.Tensor, weight: torch.Tensor, b: torch.Tensor):
    """The SSM from a zero state as one long convolution: x (C, B, t) fp32; dtA, weight = C * b, b (C, N)
    -> y (C, B, t) without the D term, final state (C, B, N)."""
    t = x.shape[-1]
    powers = _powers(dtA, t)  # (C, N, t)
    kernel = weight[:, None] @ powers  # (C, 1, t): sum_n w_n a_n^s
    state = b[:, None] * (x.flip(-1) @ powers.transpose(1, 2))  # h_t = sum_s a^s b x_(t-1-s)
    # Linear (not circular) convolution: zero-pad both to 2t before the FFT.
    y = torch.fft.irfft(torch.fft.rfft(x, n=2 * t) * torch.fft.rfft(kernel, n=2 * t), n=2 * t)[..., :t]
    return y, state


def _from_state(start: torch.Tensor, dtA: torch.Tensor, C: torch.Tensor, t: int) -> torch.Tensor:
    """What state `start` (C, B, N) adds to the next t outputs: (C, B, t), sum_n C_n a_n^(s+1) start_n at
    step s; in blocks of FFT_BLOCK steps, each from the state decayed to its start (a^(jL) start)."""
    L = min(t, FFT_BLOCK)
    n_blocks = -(-t // L)
    decays = torch.exp(dtA[:, None] * (L * torch.arange(n_blocks, device=dtA.device))[:, None])  # (C, nb, N)
    weight = (start[:, :, None] * decays[:, None] * C[:, None, None]).flatten(1, 2)  # (C, B * nb, N)
    return (weight @ _powers(dtA, L, first=1)).unflatten(1, (start.shape[1], -1)).flatten(2)[..., :t]


class DiagonalSSM(nn.Module):
    """S4D-Real SSM with `n_filters` independent filters per input channel: (B, T, D) -> (B, T, D * n_filters).

    Output channel c reads input channel c // n_filters.
    """

    def __init__(self, d_model: int, n_filters: int, d_state: int, dt_range: tuple[float, float]):
        super().__init__()
        self.n_filters, self.dt_range = n_filters, dt_range
        channels = d_model * n_filters
        self.log_dt = nn.Parameter(torch.empty(channels))
        self.A_log = nn.Parameter(torch.empty(channels, d_state))
        self.C = nn.Parameter(torch.empty(channels, d_state))
        self.D = nn.Parameter(torch.empty(channels))
        exclude_from_weight_decay(self, ("log_dt", "A_log", "D"))

    @torch.no_grad()
    def init_weights(self) -> None:
        """S4D's init: log-uniform dt, A_n = -(n + 1), C ~ N(0, 1), D = 1."""
        lo, hi = self.dt_range
        self.log_dt.uniform_(math.log(lo), math.log(hi))
        self.A_log.copy_(torch.log(torch.arange(1, self.A_log.shape[1] + 1.0)).expand_as(self.A_log))
        nn.init.normal_(self.C)
        self.D.fill_(1.0)

    def _discrete(self) -> tuple[torch.Tensor, torch.Tensor]:
        """dt * A and b = (exp(dt A) - 1) / A, both (C, N) fp32."""
        A = -torch.exp(self.A_log.float())
        dtA = torch.exp(self.log_dt.float())[:, None] * A
        return dtA, torch.expm1(dtA) / A

    def init_state(self, batch_size: int, device=None) -> torch.Tensor:
        return torch.zeros(batch_size, *self.C.shape, device=device, dtype=torch.float32)

    def forward(self, x: torch.Tensor, channels: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> y (B, T, C) in x's dtype, final state (B, C, N) fp32; from a zero state.
        `channels`: x holds only those input channels (a sequence-parallel rank's share); y holds theirs."""
        nf = self.n_filters
        u = x.float().permute(2, 0, 1).repeat_interleave(nf, dim=0)  # (C, B, T)
        out = slice(None) if channels is None else slice(channels.start * nf, channels.stop * nf)
        dtA, b = (z[out] for z in self._discrete())
        y, state = self._run(u, dtA, self.C[out].float(), b)
        y = y + self.D[out].float()[:, None, None] * u
        if y.requires_grad:  # its gradient arrives in (B, T, C) order: one copy here, not one per matrix in each bmm
            y.register_hook(torch.Tensor.contiguous)
        return y.permute(1, 2, 0).to(x.dtype), state.transpose(0, 1)

    @staticmethod
    def _run(u: torch.Tensor, dtA: torch.Tensor, C: torch.Tensor, b: torch.Tensor):
        """u (C, B, T) -> y (C, B, T) without the D term, final state (C, B, N): FFT convolutions over blocks
        of FFT_BLOCK tokens, each corrected by the state the blocks before it leave (the recurrence is linear).
        One FFT over the whole sequence cost log T per token and ran its 2T transforms out of cache."""
        t, L = u.shape[-1], FFT_BLOCK
        if t <= L:
            return _fft_run(u, dtA, C * b, b)
        whole, batch = t // L * L, u.shape[1]
        blocks = u[..., :whole].unflatten(-1, (-1, L)).flatten(1, 2)  # (C, B * nb, L)
        y, own = (z.unflatten(1, (batch, -1)) for z in _fft_run(blocks, dtA, C * b, b))  # each from a zero state
        decay, state, starts = torch.exp(dtA * L)[:, None], torch.zeros_like(own[:, :, 0]), []
        for own_j in own.unbind(2):
            starts.append(state)
            state = torch.addcmul(own_j, decay, state)
        y = y + _from_state(torch.stack(starts, 2).flatten(1, 2), dtA, C, L).unflatten(1, (batch, -1))
        y = y.flatten(2)  # (C, B, whole)
        if whole < t:  # the shorter last block
            y_tail, own = _fft_run(u[..., whole:], dtA, C * b, b)
            y = torch.cat([y, y_tail + _from_state(state, dtA, C, t - whole)], dim=-1)
            state = torch.addcmul(own, torch.exp(dtA * (t - whole))[:, None], state)
        return y, state

    def from_state(self, y: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """y (B, T, C), the outputs of a run from a zero state, as they are from state `start` (B, C, N): the
        recurrence is linear and time-invariant, so it adds sum_n C_n a_n^(t+1) start_n to y_t."""
        correction = _from_state(start.transpose(0, 1), self._discrete()[0], self.C.float(), y.shape[1])
        return y + correction.permute(1, 2, 0).to(y.dtype)

    def transition(self, t: int) -> torch.Tensor:
        """a^t (C, N): what T tokens do to the state they start from (h_T = a^T h_0 + the run from zero)."""
        return torch.exp(self._discrete()[0] * t)

    def step(self, x_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t (B, D) -> y_t (B, C), new state (B, C, N)."""
        u = x_t.float().repeat_interleave(self.n_filters, dim=1)  # (B, C)
        dtA, b = self._discrete()
        state = torch.exp(dtA) * state + b * u[..., None]
        y = (state * self.C.float()).sum(-1) + self.D.float() * u
        return y.to(x_t.dtype), state


def _blocks(z: torch.Tensor, w: int) -> torch.Tensor:
    """(B, T, ...) -> (B * nb, W, ...): blocks of w tokens, the last zero-padded."""
    nb = -(-z.shape[1] // w)
    z = F.pad(z, [0, 0] * (z.dim() - 2) + [0, nb * w - z.shape[1]])
    return z.unflatten(1, (nb, w)).flatten(0, 1)


@dataclass
class BSTState:
    ssm: torch.Tensor  # (B, C, N) fp32: SSM state after the last token
    context: KVCache  # (B, H_kv, S, hd): keys/values of the current block's context states
    block: KVCache  # (B, H_kv, < W, hd): keys/values of the current block's tokens so far (in-block RoPE)
    next_context: torch.Tensor  # single_head: (B, < W, D) SSM outputs of the current block; else (B, 0, C)
    seen: int  # tokens consumed so far


class BSTMixer(nn.Module):
    kernel_ops = ("attention",)  # its SSM is an FFT convolution in PyTorch, not a mixer_kernels/ op

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        c = cfg.bst
        self.variant, self.block_size, self.d_model = c.context, c.block_size, cfg.d_model
        self.n_context = c.block_size if c.context == "single_head" else c.n_context_states
        n_filters = c.n_context_states if c.context == "multi_filter" else 1
        self.ssm = DiagonalSSM(cfg.d_model, n_filters, c.d_state, (c.dt_min, c.dt_max))
        # The block transformer's own projections and RoPE are the attention mixer's.
        self.attn = AttentionMixer(cfg, layer_idx)
        kv_dim = self.attn.n_kv_heads * self.attn.head_dim
        self.ctx_heads = nn.Linear(cfg.d_model, self.n_context * cfg.d_model, bias=False) if (
            c.context == "multi_head") else None
        self.ctx_k_proj = nn.Linear(cfg.d_model, kv_dim, bias=False)
        self.ctx_v_proj = nn.Linear(cfg.d_model, kv_dim, bias=False)

    def init_weights(self) -> None:
        self.ssm.init_weights()

    def flops_per_token(self, seq_len: int) -> float:
        """The block transformer (each token reads its block's context states and its block; blocks are padded
        to W) and the context states' projections, once per block. The SSM is an FFT convolution: uncounted."""
        d, kv_dim, w = self.d_model, self.attn.n_kv_heads * self.attn.head_dim, self.block_size
        context = self.n_context * 2 * linear(d, kv_dim)  # keys and values of the S states
        context += linear(d, self.n_context * d) if self.variant == "multi_head" else 0
        return self.attn.projection_flops() + self.attn.attention_flops(self.n_context + w) + context / w

    def _context_kv(self, src: torch.Tensor, kv_heads: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """Context keys/values (N, h_kv, S, hd) of the KV heads `kv_heads` from SSM outputs of the preceding
        block: single_head takes all of them, src (N, W, D); multi_head / multi_filter its last one, src (N, C)."""
        if self.variant == "single_head":
            states = src
        elif self.variant == "multi_head":
            states = self.ctx_heads(src).unflatten(-1, (self.n_context, self.d_model))
        else:  # filter f of channel d is SSM channel d * S + f
            states = src.unflatten(-1, (self.d_model, self.n_context)).transpose(-1, -2)
        states = F.gelu(states)  # (N, S, D)
        hd = self.attn.head_dim
        rows = slice(None) if kv_heads == slice(None) else slice(kv_heads.start * hd, kv_heads.stop * hd)
        k, v = (F.linear(states, proj.weight[rows]).unflatten(-1, (-1, hd)).transpose(1, 2)
                for proj in (self.ctx_k_proj, self.ctx_v_proj))
        return k, v

    def init_state(self, batch_size: int, device=None, dtype=None) -> BSTState:
        empty = torch.zeros(batch_size, self.attn.n_kv_heads, 0, self.attn.head_dim, device=device, dtype=dtype)
        zeros = torch.zeros(batch_size, self.attn.n_kv_heads, self.n_context, self.attn.head_dim, device=device,
                            dtype=dtype)  # the context of block 0: zero states give zero keys and values
        width = self.d_model if self.variant == "single_head" else self.ssm.C.shape[0]
        return BSTState(self.ssm.init_state(batch_size, device), KVCache(zeros, zeros.clone()),
                        KVCache(empty, empty.clone()), torch.zeros(batch_size, 0, width, device=device, dtype=dtype),
                        0)

    def forward(self, x: torch.Tensor, state: BSTState | None = None) -> tuple[torch.Tensor, BSTState]:
        """x (B, T, D) -> y (B, T, D), state after the last token."""
        if state is not None:  # continuing a prefill: token by token (prefill from scratch is parallel)
            ys = []
            for t in range(x.shape[1]):
                y_t, state = self.step(x[:, t], state)
                ys.append(y_t)
            return torch.stack(ys, dim=1), state
        b, t, _ = x.shape
        w, nb = self.block_size, -(-t // self.block_size)
        u, ssm_state = self.ssm(x)  # (B, T, C)
        ck, cv = self._context_kv(self._context_sources(u).flatten(0, 1))  # (B * nb, H_kv, S, hd)
        y, (k, v) = self._block_attention(*self.attn.project(x), ck, cv)

        # Decoding state: the current block is block t // W, holding r tokens.
        done, r = divmod(t, w)
        if self.variant == "single_head":
            src = u[:, (done - 1) * w:done * w] if done else u.new_zeros(b, w, u.shape[-1])  # (B, W, D)
            nxt = u[:, done * w:]
        else:
            src = u[:, done * w - 1] if done else u.new_zeros(b, u.shape[-1])  # (B, C)
            nxt = u[:, :0]
        ctx = self._context_kv(src)
        kb, vb = (z.unflatten(0, (b, nb))[:, done, :, :r] if r else z[:b, :, :0] for z in (k, v))
        return self.attn.output(y, x), BSTState(ssm_state, KVCache(*ctx), KVCache(kb, vb), nxt, t)

    def _context_sources(self, u: torch.Tensor) -> torch.Tensor:
        """SSM outputs u (B, T, C) -> what each block's context states are made of, read from the block
        before it (zeros for block 0): its W outputs (B, nb, W, C) for single_head, else its last (B, nb, C)."""
        u_blocks = _blocks(u, self.block_size).unflatten(0, (u.shape[0], -1))  # (B, nb, W, C)
        src = u_blocks if self.variant == "single_head" else u_blocks[:, :, -1]
        return torch.cat([torch.zeros_like(src[:, :1]), src[:, :-1]], dim=1)

    def _block_attention(self, q, k, v, ck, cv):
        """q (B, T, h, hd), k and v (B, T, h_kv, hd), context keys/values (B * nb, h_kv, S, hd) -> y (B, T, h, hd)
        and the RoPE'd keys/values by block (B * nb, h_kv, W, hd)."""
        b, t = q.shape[:2]
        q, k, v = (_blocks(z, self.block_size).transpose(1, 2) for z in (q, k, v))  # (B * nb, h, W, hd)
        q, k = self.attn._rope(q, k, 0)  # in-block positions
        y = attention(q, torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2), q_offset=self.n_context)
        return y.transpose(1, 2).unflatten(0, (b, -1)).flatten(1, 2)[:, :t], (k, v)  # (B, T, h, hd)

    # Sequence parallelism (train/sequence_parallel.py). The block attention is independent across heads and
    # the SSM across channels, so both run on whole sequences of this rank's share (heads, and d_model / sp
    # SSM input channels with their filters: x goes through an all-to-all too). Context states mix channels:
    # each rank gathers, over channels, the SSM outputs they are made of (one per block for multi_head and
    # multi_filter, all of them for single_head) and projects its own heads' context keys/values.
    def sp_head_counts(self) -> dict[str, int]:
        return {**self.attn.sp_head_counts(), "model.d_model (BST's SSM channels)": self.d_model}

    def sp_forward(self, x: torch.Tensor, sp, docs=None) -> torch.Tensor:
        """This rank's tokens x (B, T/sp, D) -> y (B, T/sp, D); `docs`: packed documents over the whole rows
        (every rank of the group makes the same all-gathers: it has the same documents)."""
        def mix(q, k, v, xs):  # whole rows: q (B, T, h, hd), k and v (B, T, h_kv, hd), xs (B, T, D / sp)
            u, _ = self.ssm(xs, sp.local(self.d_model))  # (B, T, C / sp)
            src = sp.all_gather(self._context_sources(u), dim=-1)  # every channel
            ck, cv = self._context_kv(src.flatten(0, 1), sp.local(self.attn.n_kv_heads))
            return self._block_attention(q, k, v, ck, cv)[0]

        whole = [sp.seq_to_heads(z) for z in (*self.attn.project(x), x)]
        y = mix(*whole) if docs is None else per_document(mix, whole, docs)
        return self.attn.output(sp.heads_to_seq(y), x)

    # Context parallelism (train/context_parallel.py, mode 'composite'). The SSM passes its state: every rank
    # all-gathers each piece's final state from zero, folds those before it through the pieces' transitions a^P
    # (input-independent), and corrects its outputs (linear in the start state: no recomputation). Blocks sit
    # at absolute positions, so the piece's first block may begin in the previous piece, and each block's
    # context comes from the block before: a halo of the previous piece's last W - 1 inputs and last 2W - 1
    # (single_head) or W SSM outputs.
    def cp_forward(self, x: torch.Tensor, cp) -> torch.Tensor:
        """This rank's piece x (B, T/cp, D) -> y (B, T/cp, D) (packed documents run gathered)."""
        t, w = x.shape[1], self.block_size
        u, own = self.ssm(x)
        owns = [row[0] for row in cp.gather_flat([own])]
        start, a = owns[0], self.ssm.transition(t)
        for j in range(1, cp.rank):
            start = a * start + owns[j]
        if cp.rank:
            u = self.ssm.from_state(u, start)
        offset = cp.offset(t)
        span = offset % w + t  # tokens from the start of the piece's first block on
        x_ext = cp.before(x, w - 1)[:, -span:]
        u_ext = cp.before(u, 2 * w - 1 if self.variant == "single_head" else w)
        # The first block's context, from the block before it (zeros for block 0); the later blocks' from u.
        if offset < w:
            first = None
        elif self.variant == "single_head":
            first = u_ext[:, -span - w:-span]  # (B, W, C)
        else:
            first = u_ext[:, -span - 1]  # (B, C)
        src = self._context_sources(u_ext[:, -span:])
        if first is not None:
            src = torch.cat([first[:, None], src[:, 1:]], dim=1)
        ck, cv = self._context_kv(src.flatten(0, 1))
        y, _ = self._block_attention(*self.attn.project(x_ext), ck, cv)
        return cp.tie(self.attn.output(y[:, -t:], x), *owns)

    def step(self, x_t: torch.Tensor, state: BSTState) -> tuple[torch.Tensor, BSTState]:
        """x_t (B, D) -> y_t (B, D), state after this token."""
        u_t, ssm_state = self.ssm.step(x_t, state.ssm)  # (B, C)
        q, k, v = (z.transpose(1, 2) for z in self.attn.project(x_t[:, None]))  # (B, h, 1, hd)
        j = state.seen % self.block_size  # position inside the current block
        q, k = self.attn._rope(q, k, j)
        k, v = torch.cat([state.block.k, k], dim=2), torch.cat([state.block.v, v], dim=2)
        keys, values = torch.cat([state.context.k, k], dim=2), torch.cat([state.context.v, v], dim=2)
        y = attention(q, keys, values, q_offset=keys.shape[2] - 1).transpose(1, 2)  # (B, 1, H, hd)
        out = self.attn.output(y, x_t[:, None])[:, 0]
        nxt = torch.cat([state.next_context, u_t[:, None]], dim=1) if self.variant == "single_head" else \
            state.next_context
        context, block = state.context, KVCache(k, v)
        if j == self.block_size - 1:  # block complete: the next one reads its summary
            context = KVCache(*self._context_kv(nxt if self.variant == "single_head" else u_t))
            block = KVCache(k[:, :, :0], v[:, :, :0])
            nxt = nxt[:, :0]
        return out, BSTState(ssm_state, context, block, nxt, state.seen + 1)
