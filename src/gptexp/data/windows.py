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


class EpochBatches(RandomBatches):
    """Like RandomBatches, but the windows tile the tokens (offsets 0, T, 2T, ...) and are drawn without
    replacement: each epoch is a fresh permutation of all windows (seeded by (seed, epoch)), so every token is
    read once before any is read twice, as llm.c reads its shards. Batch k is positions [kB, (k+1)B) of the
    epochs laid end to end, which depends only on (seed, k): resume is exact, and the processes of a
    distributed run, each taking its slice of a batch, never read the same window in an epoch."""

    def __init__(self, n_tokens: int, seq_len: int, batch_size: int, num_batches: int, seed: tuple[int, ...],
                 start: int | Callable[[], int] = 0, rank: int = 0, world_size: int = 1):
        super().__init__(n_tokens, seq_len, batch_size, num_batches, seed, start, rank, world_size)
        self.seq_len, self.n_windows = seq_len, (n_tokens - 1) // seq_len
        self._epoch, self._order = None, None

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng((*self.seed, epoch)).permutation(self.n_windows)
        return self._order

    def __iter__(self):
        size = self.batch_size * self.world_size
        for k in range(self._start(), self.num_batches):
            positions = np.arange(k * size, (k + 1) * size)[self.rank * self.batch_size:][:self.batch_size]
            epochs, within = np.divmod(positions, self.n_windows)
            windows = np.empty(self.batch_size, dtype=np.int64)
            for epoch in np.unique(epochs):
                mask = epochs == epoch
                windows[mask] = self.order(int(epoch))[within[mask]]
            yield windows * self.seq_len


class SequentialBatches(Sampler):
    """Consecutive non-overlapping windows covering the whole array (every token predicted once;
    a tail shorter than one window is left out), or its first `max_tokens` tokens' worth of whole
    windows, in batches of `batch_size` (smaller where that leaves a process without a batch); with
    several processes, process `rank` takes every world_size-th batch."""

    def __init__(self, n_tokens: int, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 max_tokens: int | None = None):
        n_windows = (n_tokens - 1) // seq_len
        if max_tokens is not None:
            n_windows = min(n_windows, max_tokens // seq_len)
        offsets = np.arange(n_windows) * seq_len
        batch_size = max(1, min(batch_size, -(-n_windows // world_size)))  # a batch for every process
        self.batches = [offsets[i:i + batch_size] for i in range(0, len(offsets), batch_size)][rank::world_size]

    def __iter__(self):
        yield from self.batches

    def __len__(self) -> int:
        return len(self.batches)
