"""Batches of whole examples (instruction and preference data, gptexp.data.instruct), and their LightningDataModule.

A row holds one example, padded to the longest of its batch (data.group_by_length: batches of similar lengths),
or several examples packed into the window (data.packing), each attending only to itself (the model's
`documents`). A row's targets are the example's trained tokens (its answers and their EOS; every token after the
first with data.train_on_prompt), -1 elsewhere. Every training batch also says how many targets its whole
optimizer step holds, across its micro-batches and processes (`step_tokens`; preference batches: `step_pairs`),
which the objectives divide the summed loss by: the step's loss is then the same however it is split.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from gptexp.core.config import ConfigError
from gptexp.data.instruct import Examples, described

log = logging.getLogger(__name__)
GROUP = 64  # data.group_by_length: examples sorted by length within groups of 64 batches


def fitted(examples: Examples, window: int, train_on_prompt: bool) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Each example as (input ids, targets) of at most `window` positions. One longer is cut to fit: inside an answer,
    that answer is cut short and closed by its EOS (trained); elsewhere (in a later exchange's prompt) after the last
    whole exchange, so that no EOS is ever trained after half a user turn. One whose prompt alone fills the window is
    dropped. Also how many were dropped."""
    inputs, targets, dropped = [], [], 0
    for i in range(len(examples)):
        ids, answer = (np.asarray(a) for a in examples.example(i))
        ids, trained = ids.astype(np.int64), answer.copy()
        first = int(np.argmax(answer))  # the first answer token: the prompt is ids[:first]
        if train_on_prompt:
            trained[1:] = True
        if len(ids) > window + 1:
            if first >= window:  # the prompt fills the window: not even the EOS would follow it
                dropped += 1
                inputs.append(None), targets.append(None)
                continue
            if answer[window - 1] and answer[window]:  # inside an answer: cut it short, closed by its EOS
                ids = np.concatenate([ids[:window], ids[-1:]])
                trained = np.concatenate([trained[:window], [True]])
            else:  # after the last exchange whose answer's EOS fits (each answer's last trained token)
                closed = answer[:window + 1] & ~answer[1:window + 2]
                end = int(np.flatnonzero(closed)[-1]) + 1
                ids, trained = ids[:end], trained[:end]
        inputs.append(ids[:-1])
        targets.append(np.where(trained[1:], ids[1:], -1))
    return inputs, targets, dropped


class ExampleBatches(Sampler):
    """Training micro-batches of rows of example indices, `num_batches` of them for this process from batch
    `start` on. Epochs of shuffled examples (seeded by (seed, epoch)) are laid end to end as a stream of rows;
    global micro-batch k is rows [kB, (k + 1)B) of it, and process r takes micro-batch m * world_size + r, so
    micro-batch m depends only on (seed, m, r): resume is exact, and processes never share a row. Each batch
    comes with `step_tokens`, the targets of its optimizer step's `accumulate` x world_size micro-batches."""

    def __init__(self, lengths: np.ndarray, counts: np.ndarray, batch_size: int, num_batches: int, seed: tuple,
                 start: int | Callable[[], int] = 0, rank: int = 0, world_size: int = 1, accumulate: int = 1,
                 packing: int | None = None, group_by_length: bool = False):
        self.lengths, self.counts = lengths, counts  # per example (-1: dropped), and its target count
        self.kept = np.flatnonzero(lengths >= 0)
        self.batch_size, self.num_batches, self.seed, self.start = batch_size, num_batches, seed, start
        self.rank, self.world_size, self.accumulate = rank, world_size, accumulate
        self.packing, self.group_by_length = packing, group_by_length
        self.epochs: list[list[list[int]]] = []  # each epoch's rows, as far as needed

    def rows(self, epoch: int) -> list[list[int]]:
        while len(self.epochs) <= epoch:
            order = np.random.default_rng((*self.seed, len(self.epochs))).permutation(self.kept)
            if self.group_by_length:  # similar lengths together, the groups' batches in a shuffled order
                size = GROUP * self.batch_size
                order = np.concatenate([group[np.argsort(-self.lengths[group], kind="stable")]
                                        for group in np.split(order, range(size, len(order), size))])
            rows = pack(order, self.lengths, self.packing) if self.packing else [[int(i)] for i in order]
            self.epochs.append(rows)
        return self.epochs[epoch]

    def stream(self, first: int, count: int) -> list[list[int]]:
        """Rows [first, first + count) of the epochs laid end to end."""
        out, epoch, position = [], 0, first
        while True:
            rows = self.rows(epoch)
            if position < len(rows):
                out += rows[position:position + count - len(out)]
                if len(out) == count:
                    return out
                position = 0
            else:
                position -= len(rows)
            epoch += 1

    def global_batch(self, k: int) -> list[list[int]]:
        return self.stream(k * self.batch_size, self.batch_size)

    def step_tokens(self, step: int) -> int:
        """The targets of optimizer step `step`: all its micro-batches, every process's."""
        per_step = self.accumulate * self.world_size
        return sum(int(self.counts[i]) for g in range(step * per_step, (step + 1) * per_step)
                   for row in self.global_batch(g) for i in row)

    def __iter__(self):
        per_step = self.accumulate * self.world_size
        counted = (None, 0)  # (step, its targets): counted once for its micro-batches
        for m in range(self._start(), self.num_batches):
            step = m // self.accumulate
            if counted[0] != step:
                counted = (step, self.step_tokens(step))
            yield {"rows": self.global_batch(m * self.world_size + self.rank), "step_tokens": counted[1],
                   "step_pairs": self.batch_size * per_step}

    def _start(self) -> int:
        return self.start() if callable(self.start) else self.start

    def __len__(self) -> int:
        return self.num_batches


def pack(order: np.ndarray, lengths: np.ndarray, window: int) -> list[list[int]]:
    """Examples in `order` filled into rows of `window` positions, each row taking the next examples while they fit."""
    rows, row, used = [], [], 0
    for i in order:
        if row and used + lengths[i] > window:
            rows.append(row)
            row, used = [], 0
        row.append(int(i))
        used += int(lengths[i])
    return rows + [row] if row else rows


class ExampleRows(Dataset):
    """Maps a batch of rows of example indices to tensors: x, y (B, T) (padding: input 0, target -1) and, for packed
    rows, documents (B, T); preference batches put the chosen examples' rows first, then the rejected ones'."""

    def __init__(self, inputs: list, targets: list, pairs: int | None = None, width: int | None = None):
        self.inputs, self.targets, self.pairs, self.width = inputs, targets, pairs, width

    def __getitem__(self, batch: dict) -> dict:
        rows = batch["rows"]
        if self.pairs is not None:  # pair i is examples i (chosen) and pairs + i (rejected)
            rows = [row for row in rows] + [[i + self.pairs for i in row] for row in rows]
        lengths = [sum(len(self.inputs[i]) for i in row) for row in rows]
        width = self.width or max(lengths)
        x = torch.zeros(len(rows), width, dtype=torch.long)
        y = torch.full((len(rows), width), -1, dtype=torch.long)
        documents = torch.zeros(len(rows), width, dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for d, i in enumerate(row):
                n = len(self.inputs[i])
                x[r, at:at + n], y[r, at:at + n] = torch.from_numpy(self.inputs[i]), torch.from_numpy(self.targets[i])
                documents[r, at:at + n] = d
                at += n
            documents[r, at:] = len(row)  # the padding is a document of its own
        out = {"x": x, "y": y, **{k: v for k, v in batch.items() if k != "rows"}}
        return out | ({"documents": documents} if self.width else {})


class ExampleDataModule(L.LightningDataModule):
    """Training micro-batches (ExampleBatches) and every validation example once, for instruction (x, y targets on
    the answers) or preference data (chosen and rejected rows)."""

    def __init__(self, config, examples, seq_len: int, seed: int = 0):
        super().__init__()
        self.config, self.source, self.seq_len, self.seed = config, examples, seq_len, seed
        self.tokenizer = examples.tokenizer
        self.pairs = examples.pairs
        self.splits: dict = {}

    def prepare_data(self) -> None:
        self.source.prepare()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        for split, examples in self.source.load().items():
            inputs, targets, dropped = fitted(examples, self.seq_len, self.config.train_on_prompt)
            if self.pairs:  # a pair goes when either of its answers does
                n = len(inputs) // 2
                gone = [inputs[i] is None or inputs[n + i] is None for i in range(n)]
                for i in np.flatnonzero(gone):
                    inputs[i] = inputs[n + i] = targets[i] = targets[n + i] = None
                dropped = int(sum(gone))
            if dropped:
                log.warning("%s: %d %s whose prompt alone fills the %d-token window dropped", split, dropped,
                            "pairs" if self.pairs else "examples", self.seq_len)
            left = sum(t is not None for t in targets[:len(targets) // 2 if self.pairs else None])
            if not left:
                raise ConfigError(f"{described(self.config)}: no {split} example is left once the {dropped} whose "
                                  f"prompt alone fills the {self.seq_len}-token window are dropped; raise data.seq_len "
                                  f"(up to the model's context) or shorten the prompts")
            self.splits[split] = (inputs, targets)
        self.report_padding()

    def sample_prompt(self) -> list[int]:
        """The first validation example's prompt: what the samples callback asks the model during training."""
        inputs, targets = self.splits["val"]
        i = next(i for i, t in enumerate(targets) if t is not None)
        return inputs[i][:int(np.argmax(targets[i] >= 0)) + 1].tolist()

    def lengths(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        inputs, targets = self.splits[split]
        n = len(inputs) // 2 if self.pairs else len(inputs)
        lengths = np.array([-1 if inputs[i] is None else len(inputs[i]) for i in range(n)])
        counts = np.array([0 if targets[i] is None else int((targets[i] >= 0).sum()) for i in range(n)])
        return lengths, counts

    def report_padding(self) -> None:
        """Log what share of the first epoch's training positions is padding."""
        lengths, _ = self.lengths("train")
        sampler = self.sampler(num_batches=1)
        rows = sampler.rows(0)
        real = sum(int(lengths[i]) for row in rows for i in row)
        B = self.config.batch_size
        batches = [rows[k:k + B] for k in range(0, len(rows), B)]
        total = sum(len(b) * (self.seq_len if self.config.packing else max(sum(lengths[i] for i in r) for r in b))
                    for b in batches)
        how = "packed" if self.config.packing else "padded to the longest" + " (grouped by length)" * bool(
            self.config.group_by_length)
        log.info("training batches: %s, %.1f%% of positions are padding (%d examples in %d rows of an epoch)", how,
                 100 * (1 - real / total), sum(map(len, rows)), len(rows))

    def sampler(self, num_batches: int, start=0, rank: int = 0, world_size: int = 1, accumulate: int = 1):
        lengths, counts = self.lengths("train")
        return ExampleBatches(lengths, counts, self.config.batch_size, num_batches, seed=(self.seed, 0), start=start,
                              rank=rank, world_size=world_size, accumulate=accumulate,
                              packing=self.seq_len if self.config.packing and not self.pairs else None,
                              group_by_length=self.config.group_by_length)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        sampler = self.sampler(trainer.max_steps * trainer.accumulate_grad_batches,
                               start=lambda: trainer.global_step * trainer.accumulate_grad_batches,
                               rank=trainer.global_rank, world_size=trainer.world_size,
                               accumulate=trainer.accumulate_grad_batches)
        return self._loader("train", sampler)

    def val_dataloader(self) -> DataLoader:
        lengths, _ = self.lengths("val")
        kept = np.flatnonzero(lengths >= 0)
        size = self.config.eval_batch_size or self.config.batch_size
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        if len(kept) < world:
            raise ConfigError(f"data=instruct: {len(kept)} validation examples for {world} processes; give each one")
        # as many batches for every process (DDP keeps them in step), each example once
        count = world * -(-len(kept) // (world * size))
        batches = [{"rows": [[int(i)] for i in part]} for part in np.array_split(kept, count)]
        return self._loader("val", batches[rank::world])

    def _loader(self, split: str, sampler) -> DataLoader:
        inputs, targets = self.splits[split]
        pairs = len(inputs) // 2 if self.pairs else None
        width = self.seq_len if self.config.packing and not self.pairs and split == "train" else None
        return DataLoader(ExampleRows(inputs, targets, pairs, width), sampler=sampler, batch_size=None,
                          num_workers=self.config.num_workers, generator=torch.Generator().manual_seed(self.seed))
