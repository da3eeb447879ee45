"""Key/value cache for incremental decoding, the causal attention that reads it, and the positions and mask of
packed documents."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    """Preallocated keys and values of every layer, shape (n_layer, B, n_kv_head, max_len, head_dim).

    `length` is the number of positions already stored; the model advances it once per forward,
    after all its layers have called `update`. A batch of prompts of different lengths is left-padded:
    `pad` (B,) counts each row's padding, which no real token attends to and which positions skip.
    """

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 *, dtype: torch.dtype, device: torch.device | str, pad: torch.Tensor | None = None):
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0
        self.pad = None if pad is None else pad.to(device)
        self._mask = None

    def positions(self, T: int) -> torch.Tensor | None:
        """(B, T) positions of the next T tokens of each row (padding skipped); None without padding."""
        if self.pad is None:
            return None
        steps = torch.arange(self.length, self.length + T, device=self.pad.device)
        return (steps[None] - self.pad[:, None]).clamp(min=0)

    def attention_mask(self, T: int) -> torch.Tensor | None:
        """(B, 1, T, length + T) boolean: which stored positions each of the next T queries sees (causal, no
        padding; a padding query sees itself, so no row is all masked); None without padding. Computed once
        per forward and shared by its layers."""
        if self.pad is None:
            return None
        if self._mask is None or self._mask[0] != (self.length, T):
            queries = torch.arange(self.length, self.length + T, device=self.pad.device)[:, None]
            keys = torch.arange(self.length + T, device=self.pad.device)[None]
            real = keys[None] >= self.pad[:, None, None]
            mask = (keys <= queries)[None] & (real | (keys == queries)[None])
            self._mask = ((self.length, T), mask[:, None])
        return self._mask[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, D) at positions [length, length + T); return all positions so far."""
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; writing up to {end} overflows it")
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """(B, T) position in its document (a run of one id) of each token: from 0, so packed examples run as if alone."""
    steps = torch.arange(documents.size(1), device=documents.device).expand(documents.shape)
    first = torch.ones_like(documents, dtype=torch.bool)
    first[:, 1:] = documents[:, 1:] != documents[:, :-1]
    return steps - torch.where(first, steps, 0).cummax(dim=1).values  # minus the latest document start


def document_mask(documents: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean: each token sees its document's tokens up to itself, so examples never see one another."""
    steps = torch.arange(documents.size(1), device=documents.device)
    starts = (steps - document_positions(documents))[:, :, None]  # (B, T, 1): each query's document start
    return ((steps <= steps[:, None]) & (steps >= starts))[:, None]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, offset: int = 0,
                     dropout_p: float = 0.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention of q (B, H, T, D) over k, v (B, H_kv, offset + T, D).

    Query i sits at absolute position offset + i and sees keys 0..offset + i, or what `mask`
    (KVCache.attention_mask, document_mask) allows. Grouped-query attention (H_kv < H) is handled by SDPA itself.
    """
    gqa = k.size(1) != q.size(1)
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)
    t_q, t_k = q.size(2), k.size(2)
    if offset == 0 and t_q == t_k:
        if q.dtype == torch.bfloat16 and q.device.type == "cpu" and torch.is_grad_enabled():
            # the CPU's flash-attention backward takes 2.1x as long in bf16 as in float32 (docs/benchmarks.md):
            # train it in float32, out of autocast's reach
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=dropout_p,
                                                   is_causal=True, enable_gqa=gqa)
            return y.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
    if t_q == 1:  # one new token sees every cached position
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, enable_gqa=gqa)
    mask = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(diagonal=offset)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)
