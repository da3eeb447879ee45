"""Batches of prompts, for reinforcement learning (finetune=grpo): instruction data's requests, which the policy
answers itself during training, and its validation examples, scored both by their answers' loss and by the rewards
of the policy's own greedy answers.

Rollouts are made once for a whole optimizer step (the loss of some objectives is normalised by the step's
completion tokens, which must be known before its first backward) and reused for num_iterations steps (μ), so each
training micro-batch carries every prompt its process answers in that round of steps, and which micro-batch of it
this one is. A round's prompts and its sampling seed depend only on (seed, round, process): resume is exact.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.data import DataLoader

from gptexp.core.config import ConfigError
from gptexp.data.example_batches import ExampleBatches, ExampleDataModule, ExampleRows
from gptexp.data.instruct import described

log = logging.getLogger(__name__)


class PromptBatches(ExampleBatches):
    """Training micro-batches of prompt indices: micro-batch m of optimizer step s belongs to round s // iterations,
    whose prompts are global batches [round · accumulate, (round + 1) · accumulate) of the shuffled stream (this
    process's share of each)."""

    def __init__(self, *args, iterations: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.iterations = iterations

    def __iter__(self):
        for m in range(self._start(), self.num_batches):
            round_ = m // self.accumulate // self.iterations
            first = round_ * self.accumulate
            rows = [row for k in range(first, first + self.accumulate)
                    for row in self.global_batch(k * self.world_size + self.rank)]
            seed = int(np.random.SeedSequence((*self.seed, round_, self.rank)).generate_state(1)[0])
            yield {"rows": rows, "micro": m % self.accumulate, "micro_batches": self.accumulate, "round": round_,
                   "rollout_seed": seed}


class PromptRows(ExampleRows):
    """Maps a batch of rows to its prompts (token ids in the template, the request's text and the dataset's answer);
    validation batches also get the answers' x, y (ExampleRows)."""

    def __init__(self, inputs: list, targets: list, prompts: list[tuple[list[int], str, str]]):
        super().__init__(inputs, targets)
        self.prompts = prompts

    def __getitem__(self, batch: dict) -> dict:
        indices = [i for row in batch["rows"] for i in row]
        out = {"prompts": [self.prompts[i][0] for i in indices], "requests": [self.prompts[i][1] for i in indices],
               "references": [self.prompts[i][2] for i in indices]}
        if "micro" in batch:  # training: the policy writes the answers
            return out | {k: v for k, v in batch.items() if k != "rows"}
        return super().__getitem__(batch) | out


class PromptDataModule(ExampleDataModule):
    """ExampleDataModule's validation examples; training batches of prompts (PromptBatches). A prompt must leave the
    window room for at least one new token; longer ones are dropped and counted."""

    def __init__(self, config, examples, seq_len: int, seed: int = 0, iterations: int = 1):
        super().__init__(config, examples, seq_len, seed)
        self.iterations = iterations
        self.prompts: dict[str, list] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.prompts:
            return
        self.prompts = {split: self.source.prompts(split) for split in ("train", "val")}
        long = sum(len(ids) >= self.seq_len for ids, _, _ in self.prompts["train"])
        if long == len(self.prompts["train"]):
            raise ConfigError(f"{described(self.config)}: every training prompt fills the {self.seq_len}-token window, "
                              f"leaving no room for an answer; raise data.seq_len or shorten the prompts")
        if long:
            log.warning("train: %d prompts that leave no room for an answer in the %d-token window dropped", long,
                        self.seq_len)
        super().setup(stage)

    def report_padding(self) -> None:
        lengths, _ = self.lengths("train")
        log.info("training prompts: %d, %.0f tokens on average in the template", (lengths >= 0).sum(),
                 lengths[lengths >= 0].mean())

    def lengths(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split == "val":
            return super().lengths(split)
        lengths = np.array([len(ids) if len(ids) < self.seq_len else -1 for ids, _, _ in self.prompts[split]])
        return lengths, np.zeros_like(lengths)

    def sampler(self, num_batches: int, start=0, rank: int = 0, world_size: int = 1, accumulate: int = 1):
        lengths, counts = self.lengths("train")
        return PromptBatches(lengths, counts, self.config.batch_size, num_batches, seed=(self.seed, 0), start=start,
                             rank=rank, world_size=world_size, accumulate=accumulate, iterations=self.iterations)

    def _loader(self, split: str, sampler) -> DataLoader:
        inputs, targets = self.splits[split]
        return DataLoader(PromptRows(inputs, targets, self.prompts[split]), sampler=sampler, batch_size=None,
                          num_workers=self.config.num_workers, generator=torch.Generator().manual_seed(self.seed))
