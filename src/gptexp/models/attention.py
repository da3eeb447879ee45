"""Attention as the architectures compute it: causal scaled dot-product attention over a KV cache's positions or a
mask, and the positions and mask of several documents packed in one row."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
