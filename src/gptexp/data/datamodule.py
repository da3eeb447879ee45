"""The LightningDataModule over a dataset's token files."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from gptexp.core.config import ConfigError
from gptexp.data.config import DataConfig
from gptexp.data.windows import EpochBatches, RandomBatches, SequentialBatches, TokenWindows


class TokenDataModule(L.LightningDataModule):
    """Training windows (random, or an epoch's shuffled tiling) and fixed validation windows over a dataset's
    tokens: `tokens` is a DocumentTokens, LlmcShards or gptexp.data.hf.HFTokens, whose prepare() makes the
    token files once (rank 0 of each node, under Lightning) and load() memory-maps them.

    The training loader yields exactly max_steps x accumulate_grad_batches batches; on resume it
    starts at the first batch the interrupted run had not consumed.
    """

    def __init__(self, config: DataConfig, tokens, tokenizer, seq_len: int, seed: int = 0):
        super().__init__()
        self.config, self.tokenizer, self.seq_len, self.seed = config, tokenizer, seq_len, seed
        self.source = tokens
        self.tokens = {}

    def prepare_data(self) -> None:
        self.source.prepare()

    def setup(self, stage: str | None = None) -> None:
        if self.tokens:
            return
        self.tokens = self.source.load()
        for split in ("train", "val"):
            n = len(self.tokens.get(split, ()))
            if n < self.seq_len + 1:
                raise ConfigError(f"a window of data.seq_len={self.seq_len} tokens needs at least {self.seq_len + 1} "
                                  f"tokens, but the {split} split of {self.config.name} has {n}; lower data.seq_len")
        if self.config.val_tokens is not None and self.config.val_tokens < self.seq_len:
            raise ConfigError(f"data.val_tokens={self.config.val_tokens} is less than one window of "
                              f"data.seq_len={self.seq_len} tokens; raise it, or set data.val_tokens=null for the "
                              f"whole validation split")

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        batches_per_step = trainer.accumulate_grad_batches
        batches = RandomBatches if self.config.sampling == "random" else EpochBatches
        sampler = batches(len(self.tokens["train"]), self.seq_len, self.config.batch_size,
                          num_batches=trainer.max_steps * batches_per_step, seed=(self.seed, 0),
                          start=lambda: trainer.global_step * batches_per_step, rank=trainer.global_rank,
                          world_size=trainer.world_size)
        return self._loader(self.tokens["train"], sampler)

    def val_dataloader(self) -> DataLoader:
        batch_size = self.config.eval_batch_size or max(1, 8192 // self.seq_len)
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return self._loader(self.tokens["val"], SequentialBatches(len(self.tokens["val"]), self.seq_len, batch_size,
                                                                  rank, world_size, self.config.val_tokens))

    def _loader(self, tokens, sampler) -> DataLoader:
        # a generator of its own: making an iterator then draws nothing from torch's global RNG (exact resume)
        return DataLoader(TokenWindows(tokens, self.seq_len), sampler=sampler, batch_size=None,
                          num_workers=self.config.num_workers, pin_memory=torch.cuda.is_available(),
                          generator=torch.Generator().manual_seed(self.seed))
