"""GPT-2: configuration and model (pre-LayerNorm blocks, learned positions, tanh GELU, a tied head).

Parameter names follow HF's GPT2LMHeadModel (`transformer.h.N.attn.c_attn.weight`), so HF weights load with a
plain `load_state_dict` once its Conv1D weights are transposed (gptexp.weights.hf). References: OpenAI's GPT-2
release and karpathy/nanoGPT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptexp.inference import fused_step
from gptexp.inference.kv_cache import KVCache
from gptexp.models.attention import causal_attention
from gptexp.models.base import LanguageModel


@dataclass
class GPT2Config:
    DEPTH: ClassVar[str] = "n_layer"  # the field that counts the blocks (gptexp.weights checks files' claims by it)
    block_size: int = 1024  # context length (HF: n_positions)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers, as in GPT-2

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            divisors = [h for h in range(1, self.n_head * 2 + 1) if self.n_embd % h == 0]
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                             f"n_head could be one of {divisors[-4:]}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.layer_idx = layer_idx
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        offset = 0
        if cache is not None:
            offset, mask = cache.length, cache.attention_mask(T)
            k, v = cache.update(self.layer_idx, k, v)
        y = causal_attention(q, k, v, offset=offset, dropout_p=self.dropout if self.training else 0.0, mask=mask)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, mask)
        return x + self.mlp(self.ln_2(x))


class GPT2(LanguageModel):
    lora_targets = ("c_attn",)  # the fused q, k, v projection

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()  # one matrix for the input and output embeddings
        self.apply(self._init_weights)
        for name, param in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def context_length(self) -> int:
        return self.config.block_size

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 per weight plus attention's 12·L·C·T
        (PaLM, appendix B); position embeddings are lookups and do not count."""
        weights = self.num_parameters() - self.transformer.wpe.weight.numel()
        return 6 * weights + 12 * self.config.n_layer * self.config.n_embd * seq_len

    def new_kv_cache(self, batch: int, max_len: int, pad: torch.Tensor | None = None) -> KVCache:
        c, weight = self.config, self.transformer.ln_f.weight  # the activations' dtype (a quantized model's too)
        return KVCache(c.n_layer, batch, c.n_head, max_len, c.n_embd // c.n_head, dtype=weight.dtype,
                       device=weight.device, pad=pad)

    def fused_decode_step(self, cache: KVCache) -> fused_step.FusedStep | None:
        t = self.transformer
        blocks = [fused_step.Block(b.ln_1, [b.attn.c_attn], b.attn.c_proj, b.ln_2, [b.mlp.c_fc], b.mlp.c_proj)
                  for b in t.h]
        return fused_step.build(cache, "gpt2", blocks, embedding=t.wte, norm=t.ln_f, head=self.lm_head,
                                n_head=self.config.n_head, n_kv_head=self.config.n_head, eps=t.ln_f.eps,
                                positions=t.wpe.weight)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                return_logits: bool = True, documents: torch.Tensor | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx, targets: (B, T) token ids (targets -1 are ignored). Returns logits (B, T, vocab) and the loss;
        with return_logits=False, no logits (None) and the loss computed by chunks (head_loss). documents (B, T):
        each token's example in a packed row (LanguageModel.packed_layout)."""
        start = cache.length if cache is not None else 0
        T = idx.size(1)
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than the model's block_size "
                             f"({self.config.block_size}); crop it to the last {self.config.block_size} tokens "
                             f"or use a model with a longer context")
        mask = None
        if documents is not None:
            pos, mask = self.packed_layout(idx, documents, cache)
        elif cache is not None and cache.pad is not None:
            pos = cache.positions(T)
        else:
            pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = self.run_block(block, x, cache, mask)
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.length += T
        return self.output(x, targets, return_logits)

    def tie_weights(self) -> None:
        """Share the token embedding with the head again (loading with assign=True replaces the tied tensor)."""
        self.lm_head.weight = self.transformer.wte.weight
