"""Training and validation windows over a token array, sampled in whole batches."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class TokenWindows(Dataset):
    """Maps an array of start offsets to a batch (x, y): x = tokens[o:o+T], y = tokens[o+1:o+T+1]."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self._span = np.arange(seq_len + 1)

    def __getitem__(self, offsets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = torch.from_numpy(self.tokens[offsets[:, None] + self._span].astype(np.int64))
        return chunk[:, :-1], chunk[:, 1:]


class RandomBatches(Sampler):
    """`num_batches` batches of uniformly random window offsets, starting at batch `start`.

    Batch k depends only on (seed, k), so a resumed run that starts at its next batch draws
    exactly the windows an uninterrupted run would have drawn.
    """

    def __init__(self, n_tokens: int, seq_len: int, batch_size: int, num_batches: int, seed: tuple[int, ...], start: int = 0):
        self.high = n_tokens - seq_len  # last valid offset + 1: the window's target needs seq_len + 1 tokens
        self.batch_size, self.num_batches, self.seed, self.start = batch_size, num_batches, seed, start

    def __iter__(self):
        for k in range(self.start, self.num_batches):
            yield np.random.default_rng((*self.seed, k)).integers(0, self.high, size=self.batch_size)

    def __len__(self) -> int:
        return self.num_batches - self.start


class SequentialBatches(Sampler):
    """Consecutive non-overlapping windows covering the whole array (every token predicted once;
    a tail shorter than one window is left out), in batches of `batch_size`."""

    def __init__(self, n_tokens: int, seq_len: int, batch_size: int):
        self.offsets = np.arange((n_tokens - 1) // seq_len) * seq_len
        self.batch_size = batch_size

    def __iter__(self):
        for i in range(0, len(self.offsets), self.batch_size):
            yield self.offsets[i:i + self.batch_size]

    def __len__(self) -> int:
        return -(-len(self.offsets) // self.batch_size)
