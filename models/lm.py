"""The causal LM every family shares: embedding, a stack of blocks, final norm, LM head, loss and decoding.

Single-device code: data and sequence parallelism are applied from outside (train/).
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.block import Block
from models.chunked_loss import LMHead
from models.config import ModelConfig
from models.documents import Documents
from models.flops import TRAINING_FACTOR, linear
from models.norms import RMSNorm


@dataclass
class LMOutput:
    logits: torch.Tensor | None  # (B, T, V); None when a training forward asked for the loss only
    state: list | None  # one recurrent state (or KV cache) per layer; None when not asked for. A packed
    # prefill (cu_seqlens with return_state) gives one such list per document, in cu_seqlens order.
    loss: torch.Tensor | None = None  # mean next-token cross-entropy over labels != -100 (+ aux_loss)
    aux_loss: torch.Tensor | None = None  # sum of the mixers' auxiliary losses (MoM load balancing), weighted


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, init: bool = True):
        """init=False leaves the initialisation to a later `reset_parameters` call (ZeRO-3's zero.Init builds
        the model already partitioned, and initialises it module by module on gathered parameters)."""
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i, name) for i, name in enumerate(cfg.layer_mixers()))
        # Mixers with parameters shared across depth (HGRN2's forget-gate lower bounds) see their peers.
        for block in self.blocks:
            if hasattr(block.mixer, "link_layers"):
                block.mixer.link_layers([b.mixer for b in self.blocks])
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if init:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, whole=lambda params: contextlib.nullcontext()) -> None:
        """`whole(params)`: a context in which those parameters are whole tensors (DeepSpeed's
        GatheredParameters for a partitioned model); entered for one module at a time."""
        for module in self.modules():
            if not isinstance(module, nn.Linear | nn.Embedding | RMSNorm):
                continue
            with whole(list(module.parameters(recurse=False))):
                if isinstance(module, nn.Linear | nn.Embedding):
                    nn.init.normal_(module.weight, std=self.cfg.init_std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
                if isinstance(module, RMSNorm):
                    nn.init.ones_(module.weight)
        # Families with special initialisation (gate biases, SSM decay rates) override the generic one.
        for block in self.blocks:
            if hasattr(block.mixer, "init_weights"):
                with whole(list(block.mixer.parameters())):
                    block.mixer.init_weights()

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm(x))
        cap = self.cfg.logits_soft_cap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        state: list | None = None,
        return_state: bool = False,
        cu_seqlens: torch.Tensor | None = None,
        row_length: int | None = None,
        return_logits: bool = True,
    ) -> LMOutput:
        """input_ids, labels: (B, T). `state` continues from an earlier call (prefill in pieces).

        cu_seqlens (N + 1,): packed documents (models/documents.py), the cumulative document lengths over
        the flattened B*T tokens; every layer then runs each document as a fresh sequence, so no token sees
        another document. Checked here, before any kernel sees it. row_length: the length of the rows
        cu_seqlens is over, when input_ids holds one sequence-parallel rank's contiguous slice of each row
        (the mixers see whole rows between their all-to-alls); None = T. With return_state, a packed prefill:
        `state` is each document's decoding state (decode each with `step` at batch size 1).

        return_logits=False (training, with labels): the LM head and the loss run chunk by chunk
        (models/chunked_loss.py), so no (B, T, V) logits exist; `logits` is None."""
        docs = None
        if cu_seqlens is not None:
            if state is not None:
                raise ValueError("packed documents (cu_seqlens) start on a fresh state; continue one document "
                                 "per row from its own state")
            docs = Documents.from_cu_seqlens(cu_seqlens, input_ids.shape[0], row_length or input_ids.shape[1],
                                             device=input_ids.device)
            if return_state:
                return self._prefill_documents(input_ids, labels, docs)
        x = self.embed(input_ids)  # (B, T, D)
        new_state = []
        for i, block in enumerate(self.blocks):
            layer_state = None if state is None else state[i]
            if self.cfg.activation_checkpointing and self.training and layer_state is None:
                x, layer_state = checkpoint(block, x, None, docs, use_reentrant=False)
            else:
                x, layer_state = block(x, layer_state, docs)
            new_state.append(layer_state)
        if labels is not None and not return_logits:
            logits = None
            loss = self.lm_head(self.norm(x), labels, self.cfg.loss_chunk_tokens, self.cfg.logits_soft_cap)
        else:
            logits = self._logits(x)
            loss = None if labels is None else lm_loss(logits, labels)
        # Mixers with an auxiliary loss (MoM's router load balancing) set `aux_loss` in their forward.
        aux = [b.mixer.aux_loss for b in self.blocks if getattr(b.mixer, "aux_loss", None) is not None]
        aux_loss = torch.stack(aux).sum() if aux else None
        if loss is not None and aux_loss is not None:
            loss = loss + aux_loss
        return LMOutput(logits, new_state if (return_state or state is not None) else None, loss, aux_loss)

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """Model FLOPs per token at sequence length `seq_len` (models/flops.py): every block and the LM head,
        times 3 for a training step (forward and backward)."""
        forward = sum(block.flops_per_token(seq_len) for block in self.blocks)
        forward += linear(self.cfg.d_model, self.cfg.vocab_size)
        return forward * (TRAINING_FACTOR if training else 1)

    def kernel_ops(self) -> dict[str, list[int]]:
        """Each mixer_kernels/ op the model calls (training and decoding) -> the layers that call it."""
        ops: dict[str, list[int]] = {}
        for i, block in enumerate(self.blocks):
            for op in block.mixer.kernel_ops:
                ops.setdefault(op, []).append(i)
        return ops

    def init_state(self, batch_size: int, device=None, dtype=None) -> list:
        return [block.mixer.init_state(batch_size, device, dtype) for block in self.blocks]

    def step(self, token: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        """One decoding step. token: (B,) ids -> logits (B, V) and the updated per-layer state."""
        x = self.embed(token)  # (B, D)
        new_state = []
        for block, layer_state in zip(self.blocks, state, strict=True):
            x, layer_state = block.step(x, layer_state)
            new_state.append(layer_state)
        return self._logits(x), new_state

    def _prefill_documents(self, input_ids: torch.Tensor, labels: torch.Tensor | None, docs: Documents) -> LMOutput:
        """Packed prefill: each document alone from a fresh state (a state is the one after a document's last
        real token, so documents are not padded together here), logits put back in the packed layout."""
        flat = input_ids.flatten()
        outs = [self(flat[a:b][None], return_state=True) for a, b in zip(docs.cu_seqlens[:-1].tolist(),
                                                                          docs.cu_seqlens[1:].tolist())]
        logits = torch.cat([o.logits[0] for o in outs]).view(*input_ids.shape, -1)
        # No auxiliary loss: a prefill is for decoding, which has none (as `step`).
        return LMOutput(logits, [o.state for o in outs], None if labels is None else lm_loss(logits, labels))

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding: prefill the prompt (B, T) in one forward, then one `step` per token."""
        out = self(prompt, return_state=True)
        token = out.logits[:, -1].argmax(-1)
        state, generated = out.state, [token]
        for _ in range(max_new_tokens - 1):
            logits, state = self.step(token, state)
            token = logits.argmax(-1)
            generated.append(token)
        return torch.cat([prompt, torch.stack(generated, dim=1)], dim=1)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per token; labels are already the next tokens (the data path shifts them)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def count_parameters(cfg: ModelConfig) -> int:
    """Parameter count of the model built on the meta device: exact, and free even for a 7B config."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    return sum(p.numel() for p in model.parameters())
