"""The LightningDataModule over a dataset's token files."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from gptexp.config import CACHE_DIR, ConfigError
from gptexp.data.llmc_shards import ShardError, read_split
from gptexp.data.token_files import load_tokens, tokenize_once
from gptexp.data.windows import RandomBatches, SequentialBatches, TokenWindows


@dataclass
class DataConfig:
    name: str  # a key of gptexp.data.DATASETS
    tokenizer: str = "model"  # "model": the model's tokenizer; "char": characters of the text, whatever the model
    seq_len: int | None = None  # tokens per window; null: the model's context length
    batch_size: int = 8
    eval_batch_size: int | None = None  # validation windows per batch; null: as many as make 8,192 tokens
    val_fraction: float = 0.1
    source: str = "auto"  # where the text comes from, for datasets with a choice: auto | bundled | hub
    cache_dir: str = CACHE_DIR
    num_workers: int = 0
    path: str | None = None  # data=text: the text file
    shards: str | None = None  # read llm.c token shards {shards}_train_*.bin / {shards}_val_*.bin instead of the text

    def __post_init__(self):
        for key in ("seq_len", "batch_size"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)}")
        if self.eval_batch_size is not None and self.eval_batch_size <= 0:
            raise ValueError(f"eval_batch_size must be a positive integer or null, got {self.eval_batch_size}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.tokenizer not in ("model", "char"):
            raise ValueError(f"tokenizer must be 'model' or 'char', got {self.tokenizer!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")


def fingerprint(splits: dict[str, list[str]]) -> str:
    """A short hash of the documents per split: token files are cached per (text, tokenizer)."""
    digest = hashlib.sha1()
    for split, documents in sorted(splits.items()):
        digest.update(f"{split}:{len(documents)}".encode())
        for document in documents:
            digest.update(document.encode() + b"\0")
    return digest.hexdigest()[:10]


class TokenDataModule(L.LightningDataModule):
    """Random training windows and fixed validation windows over cached token files (the documents
    of `splits`, tokenized once) or, with data.shards set, over llm.c's token shards.

    The training loader yields exactly max_steps x accumulate_grad_batches batches; on resume it
    starts at the first batch the interrupted run had not consumed.
    """

    def __init__(self, config: DataConfig, splits: dict[str, list[str]] | None, tokenizer, seq_len: int,
                 seed: int = 0):
        super().__init__()
        self.config, self.tokenizer, self.seq_len, self.seed = config, tokenizer, seq_len, seed
        self.splits = splits
        if splits is not None:
            self.directory = Path(config.cache_dir).expanduser() / f"{config.name}-{fingerprint(splits)}" / tokenizer.name
        self.tokens = {}

    def prepare_data(self) -> None:
        if self.splits is not None:
            tokenize_once(self.directory, self.splits, self.tokenizer)

    def setup(self, stage: str | None = None) -> None:
        self.tokens = self._shards() if self.config.shards else {
            split: load_tokens(path) for split, path in tokenize_once(self.directory, self.splits, self.tokenizer).items()}
        for split, tokens in self.tokens.items():
            if len(tokens) < self.seq_len + 1:
                raise ConfigError(f"a window of data.seq_len={self.seq_len} tokens needs at least {self.seq_len + 1} "
                                  f"tokens, but the {split} split of {self.config.name} has {len(tokens)}; "
                                  f"lower data.seq_len")

    def _shards(self) -> dict:
        try:
            tokens = {split: read_split(self.config.shards, split) for split in ("train", "val")}
        except ShardError as error:
            raise ConfigError(f"data.shards: {error}") from error
        for split, array in tokens.items():
            # every shard's largest id, one shard at a time (memory-mapped)
            largest = max(int(s.max()) for s in getattr(array, "shards", [array]) if len(s))
            if largest >= self.tokenizer.vocab_size:
                raise ConfigError(f"data.shards: the {split} shards hold token id {largest}, beyond the "
                                  f"{self.tokenizer.name} tokenizer's {self.tokenizer.vocab_size}: llm.c's shards "
                                  f"hold GPT-2 tokens, so train a GPT-2 model on them")
        return tokens

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        batches_per_step = trainer.accumulate_grad_batches
        sampler = RandomBatches(len(self.tokens["train"]), self.seq_len, self.config.batch_size,
                                num_batches=trainer.max_steps * batches_per_step, seed=(self.seed, 0),
                                start=lambda: trainer.global_step * batches_per_step, rank=trainer.global_rank,
                                world_size=trainer.world_size)
        return self._loader(self.tokens["train"], sampler)

    def val_dataloader(self) -> DataLoader:
        batch_size = self.config.eval_batch_size or max(1, 8192 // self.seq_len)
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return self._loader(self.tokens["val"], SequentialBatches(len(self.tokens["val"]), self.seq_len, batch_size,
                                                                  rank, world_size))

    def _loader(self, tokens, sampler) -> DataLoader:
        # a generator of its own: making an iterator then draws nothing from torch's global RNG (exact resume)
        return DataLoader(TokenWindows(tokens, self.seq_len), sampler=sampler, batch_size=None,
                          num_workers=self.config.num_workers, pin_memory=torch.cuda.is_available(),
                          generator=torch.Generator().manual_seed(self.seed))
