"""LLaMA-2: configuration and model (RMSNorm, rotary embeddings, SwiGLU, grouped-query attention).

Parameter names follow HF's LlamaForCausalLM (`model.layers.N.self_attn.q_proj.weight`) and the
rotary embedding uses HF's half-split layout, so HF checkpoints load as they are. Meta's and llama2.c's files,
with their q/k row order, are read in gptexp.weights.meta.
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


def llama_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's FFN width rule: 2/3 of 4·dim, optionally scaled, rounded up to a multiple (7B: 11008)."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


@dataclass
class LlamaConfig:
    DEPTH: ClassVar[str] = "n_layers"  # the field that counts the blocks (gptexp.weights checks files' claims by it)
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # grouped-query attention; null: n_heads (multi-head)
    vocab_size: int = 32000
    hidden_dim: int | None = None  # SwiGLU width; null: llama_hidden_dim(dim)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False  # output head shares the token embedding (llama2.c's small models)

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.hidden_dim = self.hidden_dim or llama_hidden_dim(self.dim)
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads}): "
                             f"each key/value head serves the same number of query heads")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"the head size dim / n_heads = {self.dim // self.n_heads} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    """x / rms(x) · weight, computed in float32 as Meta and HF do."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotary_tables(config: LlamaConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_seq_len, head_dim) in float32; frequency i sits at columns i and i + head_dim/2."""
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, config.head_dim, 2, device=device).float() / config.head_dim)
    angles = torch.outer(torch.arange(config.max_seq_len, device=device).float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by position: pairs are (x[i], x[i + D/2]), HF's layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin).to(v.dtype), apply_rotary(k, cos, sin).to(v.dtype)
        offset = 0
        if cache is not None:
            offset, mask = cache.length, cache.attention_mask(T)
            k, v = cache.update(self.layer_idx, k, v)
        y = causal_attention(q, k, v, offset=offset, mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.hidden_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(LanguageModel):
    lora_targets = ("q_proj", "v_proj")  # as in the LoRA paper and peft's default for LLaMA

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.dim),
            layers=nn.ModuleList(DecoderLayer(config, i) for i in range(config.n_layers)),
            norm=RMSNorm(config.dim, config.norm_eps),
        ))
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.tie_weights()
        cos, sin = rotary_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def context_length(self) -> int:
        return self.config.max_seq_len

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per weight (the embedding lookup excluded unless tied) plus attention's 12·L·D·T."""
        weights = self.num_parameters() - (0 if self.config.tie_embeddings else self.model.embed_tokens.weight.numel())
        return 6 * weights + 12 * self.config.n_layers * self.config.dim * seq_len

    def new_kv_cache(self, batch: int, max_len: int, pad: torch.Tensor | None = None) -> KVCache:
        c, weight = self.config, self.model.norm.weight  # the activations' dtype (a quantized model's too)
        return KVCache(c.n_layers, batch, c.n_kv_heads, max_len, c.head_dim, dtype=weight.dtype, device=weight.device,
                       pad=pad)

    def fused_decode_step(self, cache: KVCache) -> fused_step.FusedStep | None:
        blocks = [fused_step.Block(layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj], a.o_proj,
                                   layer.post_attention_layernorm, [m.gate_proj, m.up_proj], m.down_proj)
                  for layer in self.model.layers for a, m in [(layer.self_attn, layer.mlp)]]
        c = self.config
        return fused_step.build(cache, "llama", blocks, embedding=self.model.embed_tokens, norm=self.model.norm,
                                head=self.lm_head, n_head=c.n_heads, n_kv_head=c.n_kv_heads, eps=c.norm_eps,
                                rotary=(self.rope_cos, self.rope_sin))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                return_logits: bool = True, documents: torch.Tensor | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx, targets: (B, T) token ids (targets -1 are ignored). Returns logits (B, T, vocab) and the loss;
        with return_logits=False, no logits (None) and the loss computed by chunks (head_loss). documents (B, T):
        each token's example in a packed row (LanguageModel.packed_layout)."""
        start = cache.length if cache is not None else 0
        T = idx.size(1)
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens is longer than the model's max_seq_len "
                             f"({self.config.max_seq_len}); crop it or raise model.max_seq_len")
        positions, mask = None, None
        if documents is not None:
            positions, mask = self.packed_layout(idx, documents, cache)
        elif cache is not None and cache.pad is not None:
            positions = cache.positions(T)
        if positions is not None:  # each row's own positions, heads broadcast
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        else:
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        x = self.model.embed_tokens(idx)
        for layer in self.model.layers:
            x = self.run_block(layer, x, cos, sin, cache, mask)
        x = self.model.norm(x)
        if cache is not None:
            cache.length += T
        return self.output(x, targets, return_logits)

    def rebuild_buffers(self) -> None:
        self.rope_cos, self.rope_sin = rotary_tables(self.config)

    def tie_weights(self) -> None:
        """Share the token embedding with the head again where the config ties them (loading with assign=True
        replaces the tied tensor)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
