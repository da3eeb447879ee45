"""The LightningDataModule over a dataset's token files."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from gptexp.config import CACHE_DIR, ConfigError
from gptexp.data.llmc_shards import ShardError, read_split
from gptexp.data.token_files import load_tokens, tokenize_once
from gptexp.data.windows import EpochBatches, RandomBatches, SequentialBatches, TokenWindows


@dataclass
class DataConfig:
    name: str  # the dataset's name (in its cache directory and shard files)
    loader: str | None = None  # a key of gptexp.data.DATASETS (hf: gptexp.data.hf); null: the name
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
    val_tokens: int | None = None  # validate on the first val_tokens tokens of the split; null: all of it
    sampling: str = "random"  # training windows: random offsets (nanoGPT) | epoch: a shuffled tiling (llm.c)
    # data=hf (gptexp.data.hf): a hub dataset (path, subset, split, val_split) or local files (files, val_files)
    subset: str | None = None
    split: str = "train"
    val_split: str | None = None  # null: hold out every round(1 / val_fraction)-th training document
    column: str = "text"
    files: str | None = None
    val_files: str | None = None
    num_proc: int | None = None  # tokenizing processes; null: every core
    shard_tokens: int = 100_000_000
    # data=instruct (gptexp.data.instruct): records (data.files, data.path or data.builder) in a template
    format: str = "auto"  # auto | alpaca | completion | messages | sharegpt | preference
    columns: Any = None  # renames of the records' fields, {theirs: ours}, e.g. {question: instruction, answer: output}
    builder: str | None = None  # records built from the bundled TinyStories: story_words | story_word_pairs
    template: str | None = None  # llama2_chat | alpaca | plain; null: llama2_chat for a LLaMA tokenizer, else plain
    system: str | None = None  # a system prompt for conversations without one
    train_on_prompt: bool = False  # also train the prompts' tokens, not only the answers'
    packing: bool = False  # several examples a window, each attending only to itself (else one a row, padded)
    group_by_length: bool = False  # batch examples of similar lengths together (less padding)

    def __post_init__(self):
        for field in fields(self):
            if field.name in ("seq_len", "batch_size", "eval_batch_size", "val_tokens", "num_proc", "shard_tokens"):
                value = getattr(self, field.name)
                if value is not None and (isinstance(value, bool) or value <= 0):
                    nullable = " or null" * (field.default is None)
                    raise ValueError(f"{field.name} must be a positive integer{nullable}, got {value!r}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.tokenizer not in ("model", "char"):
            raise ValueError(f"tokenizer must be 'model' or 'char', got {self.tokenizer!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.sampling not in ("random", "epoch"):
            raise ValueError(f"sampling must be 'random' or 'epoch', got {self.sampling!r}")
        if self.columns is not None and not (isinstance(self.columns, dict)
                                             and all(isinstance(v, str) for v in self.columns.values())):
            raise ValueError(f"columns must map field names to field names, {{theirs: ours}}, got {self.columns!r}")


def fingerprint(splits: dict[str, list[str]]) -> str:
    """A short hash of the documents per split: token files are cached per (text, tokenizer)."""
    digest = hashlib.sha1()
    for split, documents in sorted(splits.items()):
        digest.update(f"{split}:{len(documents)}".encode())
        for document in documents:
            digest.update(document.encode() + b"\0")
    return digest.hexdigest()[:10]


class DocumentTokens:
    """Documents held in memory (the bundled texts, a local text file), tokenized once into .npy token files
    cached per (documents, tokenizer)."""

    def __init__(self, config: DataConfig, splits: dict[str, list[str]], tokenizer):
        self.splits, self.tokenizer = splits, tokenizer
        self.directory = Path(config.cache_dir).expanduser() / f"{config.name}-{fingerprint(splits)}" / tokenizer.name

    def prepare(self) -> None:
        tokenize_once(self.directory, self.splits, self.tokenizer)

    def load(self) -> dict:
        return {split: load_tokens(path) for split, path in tokenize_once(self.directory, self.splits,
                                                                          self.tokenizer).items()}


class LlmcShards:
    """llm.c token shards someone made ({prefix}_train_*.bin, {prefix}_val_*.bin), checked against the tokenizer."""

    def __init__(self, prefix: str, tokenizer):
        self.prefix, self.tokenizer = prefix, tokenizer

    def prepare(self) -> None:
        pass

    def load(self) -> dict:
        try:
            tokens = {split: read_split(self.prefix, split) for split in ("train", "val")}
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
