"""The LightningDataModule over a dataset's token files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from gptexp.config import ConfigError
from gptexp.data.token_files import load_tokens, tokenize_once
from gptexp.data.windows import RandomBatches, SequentialBatches, TokenWindows


@dataclass
class DataConfig:
    name: str  # a key of gptexp.data.DATASETS
    tokenizer: str = "model"  # "model": the model's tokenizer; "char": characters of the training text
    seq_len: int = 256  # tokens per training window
    batch_size: int = 8
    eval_batch_size: int | None = None  # validation batch; null: batch_size
    val_fraction: float = 0.1
    cache_dir: str = "~/.cache/gptexp"
    num_workers: int = 0

    def __post_init__(self):
        for key in ("seq_len", "batch_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)}")
        if self.eval_batch_size is not None and self.eval_batch_size <= 0:
            raise ValueError(f"eval_batch_size must be a positive integer or null, got {self.eval_batch_size}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.tokenizer not in ("model", "char"):
            raise ValueError(f"tokenizer must be 'model' or 'char', got {self.tokenizer!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")


class TokenDataModule(L.LightningDataModule):
    """Random training windows and fixed validation windows over cached token files.

    The training loader yields exactly max_steps x accumulate_grad_batches batches; on resume it
    starts at the first batch the interrupted run had not consumed.
    """

    def __init__(self, config: DataConfig, splits: dict[str, list[str]], tokenizer, seed: int = 0):
        super().__init__()
        self.config, self.tokenizer, self.seed = config, tokenizer, seed
        self.splits = splits
        self.directory = (Path(config.cache_dir).expanduser() / f"{config.name}-val{config.val_fraction}"
                          / tokenizer.name)
        self.tokens = {}

    def prepare_data(self) -> None:
        tokenize_once(self.directory, self.splits, self.tokenizer)

    def setup(self, stage: str | None = None) -> None:
        paths = tokenize_once(self.directory, self.splits, self.tokenizer)
        self.tokens = {split: load_tokens(path) for split, path in paths.items()}
        for split, tokens in self.tokens.items():
            if len(tokens) < self.config.seq_len + 1:
                raise ConfigError(f"data.seq_len={self.config.seq_len} needs at least {self.config.seq_len + 1} "
                                  f"tokens, but the {split} split of {self.config.name} has {len(tokens)}; "
                                  f"lower data.seq_len")

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        batches_per_step = trainer.accumulate_grad_batches
        sampler = RandomBatches(len(self.tokens["train"]), self.config.seq_len, self.config.batch_size,
                                num_batches=trainer.max_steps * batches_per_step,
                                seed=(self.seed, trainer.global_rank), start=trainer.global_step * batches_per_step)
        return self._loader(self.tokens["train"], sampler)

    def val_dataloader(self) -> DataLoader:
        batch_size = self.config.eval_batch_size or self.config.batch_size
        return self._loader(self.tokens["val"], SequentialBatches(len(self.tokens["val"]), self.config.seq_len, batch_size))

    def _loader(self, tokens, sampler) -> DataLoader:
        return DataLoader(TokenWindows(tokens, self.config.seq_len), sampler=sampler, batch_size=None,
                          num_workers=self.config.num_workers, pin_memory=torch.cuda.is_available())
