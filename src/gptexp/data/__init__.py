"""Datasets as token files, the tokenizers that make them, and the LightningDataModule that serves them."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gptexp.config import ConfigError, build_dataclass
from gptexp.data import shakespeare, text_file, tinystories
from gptexp.data.datamodule import DataConfig, TokenDataModule
from gptexp.data.tokenizers import CharTokenizer, gpt2_tokenizer, load_tokenizer

# data.name in conf/data/*.yaml -> function(val_fraction, source[, path]) -> {"train": [documents], "val": [documents]}
DATASETS: dict[str, Callable[..., dict[str, list[str]]]] = {
    "shakespeare": shakespeare.load_splits,
    "tinystories": tinystories.load_splits,
    "text": text_file.load_splits,
}

__all__ = ["DATASETS", "DataConfig", "DataSource", "TokenDataModule", "CharTokenizer", "gpt2_tokenizer", "load",
           "build"]


@dataclass
class DataSource:
    config: DataConfig
    splits: dict[str, list[str]] | None  # documents per split; None when data.shards gives the tokens
    tokenizer: Any


def load(cfg: Mapping[str, Any], model_tokenizer: str | None) -> DataSource:
    """The dataset a conf/data/*.yaml names, with the tokenizer to use: the model's (`model_tokenizer`:
    gpt2, a SentencePiece file, or char), or the characters of the text when data.tokenizer=char."""
    config = build_dataclass(DataConfig, cfg, "data")
    if config.shards:
        if config.tokenizer == "char" or model_tokenizer == "char":
            raise ConfigError("data.shards holds llm.c's GPT-2 tokens, not characters: train a GPT-2 "
                              "(model=gpt2 or model.tokenizer=gpt2) with data.tokenizer=model")
        return DataSource(config, None, load_tokenizer(model_tokenizer))
    if config.name not in DATASETS:
        raise ConfigError(f"data.name={config.name!r} is not a known dataset; choose one of {', '.join(DATASETS)}")
    loader = DATASETS[config.name]
    path = {"path": config.path} if config.path is not None else {}
    if path and "path" not in inspect.signature(loader).parameters:
        raise ConfigError(f"data.path is for data=text; data={config.name} does not read a file")
    try:
        splits = loader(config.val_fraction, source=config.source, **path)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if config.tokenizer == "char" or model_tokenizer == "char":
        return DataSource(config, splits, CharTokenizer.from_text("".join(d for docs in splits.values() for d in docs)))
    try:
        return DataSource(config, splits, load_tokenizer(model_tokenizer))
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"model.tokenizer: {error}") from error


def build(source: DataSource, context_length: int, seed: int = 0) -> TokenDataModule:
    """The data module for a model with this context: windows of data.seq_len tokens (null: the whole context)."""
    seq_len = source.config.seq_len or context_length
    if seq_len > context_length:
        raise ConfigError(f"data.seq_len={seq_len} is longer than the model's context ({context_length}); "
                          f"set data.seq_len<={context_length}")
    return TokenDataModule(source.config, source.splits, source.tokenizer, seq_len, seed=seed)
