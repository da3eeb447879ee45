"""Training and validation windows over a token array, sampled in whole batches."""

from __future__ import annotations

from collections.abc import Callable

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
    exactly the windows an uninterrupted run would have drawn. `start` may be a function, asked each
    time iteration begins. The length is always num_batches: the whole run is one epoch, which
    Lightning, resuming mid-epoch, knows to be `start` batches along. With several processes, each draws
    the global batch (batch_size x world_size windows) and takes its own slice: N processes see
    the windows one process with an N times larger batch would.
    """

    def __init__(self, n_tokens: int, seq_len: int, batch_size: int, num_batches: int, seed: tuple[int, ...],
                 start: int | Callable[[], int] = 0, rank: int = 0, world_size: int = 1):
        self.high = n_tokens - seq_len  # last valid offset + 1: the window's target needs seq_len + 1 tokens
        self.batch_size, self.num_batches, self.seed, self.start = batch_size, num_batches, seed, start
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for k in range(self._start(), self.num_batches):
            rng = np.random.default_rng((*self.seed, k))
            yield rng.integers(0, self.high, size=self.batch_size * self.world_size)[mine]

    def _start(self) -> int:
        return self.start() if callable(self.start) else self.start

    def __len__(self) -> int:
        return self.num_batches


class SequentialBatches(Sampler):
    """Consecutive non-overlapping windows covering the whole array (every token predicted once;
    a tail shorter than one window is left out), in batches of `batch_size`; with several
    processes, process `rank` takes every world_size-th batch."""

    def __init__(self, n_tokens: int, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1):
        offsets = np.arange((n_tokens - 1) // seq_len) * seq_len
        self.batches = [offsets[i:i + batch_size] for i in range(0, len(offsets), batch_size)][rank::world_size]

    def __iter__(self):
        yield from self.batches

    def __len__(self) -> int:
        return len(self.batches)
