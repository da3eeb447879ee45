"""The key/value cache of incremental decoding: what a model's attention reads back of the positions before."""

from __future__ import annotations

import torch


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

    def repeat_rows(self, times: int) -> None:
        """Each row `times` times in its place (row r becomes rows r·times ... r·times + times - 1): one prefill of a
        prompt, decoded as `times` continuations (gptexp.inference.generation.decode's fan_out)."""
        self.keys = self.keys.repeat_interleave(times, dim=1)
        self.values = self.values.repeat_interleave(times, dim=1)
        if self.pad is not None:
            self.pad = self.pad.repeat_interleave(times)
        self._mask = None

    def shift(self, by: int) -> None:
        """Move every row's positions `by` to the right (left where negative), the padding growing or shrinking
        alike, so that each row's tokens keep their positions (continuous batching: gptexp.inference.batching)."""
        if by > 0 and self.length + by > self.max_len or by < 0 and (self.pad is None or -by > int(self.pad.min())):
            raise ValueError(f"cannot shift the cache's {self.length} positions by {by}: only padding may leave it, "
                             f"and it holds {self.max_len}")
        if by and self.length:
            span, source = slice(max(by, 0), self.length + by), slice(max(-by, 0), self.length)
            self.keys[:, :, :, span] = self.keys[:, :, :, source].clone()
            self.values[:, :, :, span] = self.values[:, :, :, source].clone()
        self.length += by
        self.pad = (self.pad if self.pad is not None else torch.zeros(self.keys.size(1), dtype=torch.long,
                                                                       device=self.keys.device)) + by
        self._mask = None

    def grow(self, max_len: int) -> None:
        """Room for `max_len` positions (a batch cache that starts small and grows as its rows do)."""
        if max_len > self.max_len:
            shape = (*self.keys.shape[:3], max_len, self.keys.size(4))
            keys, values = self.keys.new_zeros(shape), self.values.new_zeros(shape)
            keys[:, :, :, :self.length], values[:, :, :, :self.length] = self.keys[:, :, :, :self.length], \
                self.values[:, :, :, :self.length]
            self.keys, self.values, self.max_len = keys, values, max_len

    def append(self, other: KVCache, times: int = 1) -> None:
        """Add `other`'s rows (each `times` times) after this cache's, their positions aligned at the right end:
        `other` may hold no more positions than this cache."""
        if other.length > self.length:
            raise ValueError(f"a cache of {other.length} positions cannot join one of {self.length}: shift it first")
        offset = self.length - other.length
        shape = list(self.keys.shape)
        shape[1] = other.keys.size(1) * times
        keys, values = self.keys.new_zeros(shape), self.values.new_zeros(shape)
        keys[:, :, :, offset:self.length] = other.keys[:, :, :, :other.length].repeat_interleave(times, dim=1)
        values[:, :, :, offset:self.length] = other.values[:, :, :, :other.length].repeat_interleave(times, dim=1)
        other_pad = (other.pad if other.pad is not None else torch.zeros(other.keys.size(1), dtype=torch.long))
        pad = other_pad.to(self.keys.device).repeat_interleave(times) + offset
        self.keys, self.values = torch.cat([self.keys, keys], dim=1), torch.cat([self.values, values], dim=1)
        self.pad = pad if self.pad is None else torch.cat([self.pad, pad])
        self._mask = None

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices, in that order)."""
        self.keys, self.values = self.keys[:, rows], self.values[:, rows]
        if self.pad is not None:
            self.pad = self.pad[rows]
        self._mask = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, D) at positions [length, length + T); return all positions so far."""
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; writing up to {end} overflows it")
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]
