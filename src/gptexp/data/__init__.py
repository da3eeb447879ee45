"""Datasets as token files, the tokenizers that make them, and the LightningDataModule that serves them."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gptexp.config import ConfigError, build_dataclass
from gptexp.data import shakespeare, text_file, tinystories
from gptexp.data.datamodule import DataConfig, DocumentTokens, LlmcShards, TokenDataModule
from gptexp.data.hf import HFTokens
from gptexp.data.tokenizers import CharTokenizer, gpt2_tokenizer, load_tokenizer

# data.loader (or data.name) in conf/data/*.yaml -> function(val_fraction, source[, path]) -> {"train": [documents],
# "val": [documents]}; data.loader=hf reads any Hugging Face dataset instead (gptexp.data.hf)
DATASETS: dict[str, Callable[..., dict[str, list[str]]]] = {
    "shakespeare": shakespeare.load_splits,
    "tinystories": tinystories.load_splits,
    "text": text_file.load_splits,
}

__all__ = ["DATASETS", "DataConfig", "DataSource", "HFTokens", "TokenDataModule", "CharTokenizer", "gpt2_tokenizer",
           "load", "build"]


@dataclass
class DataSource:
    config: DataConfig
    splits: dict[str, list[str]] | None  # documents per split; None when shards give the tokens
    tokenizer: Any
    tokens: Any  # DocumentTokens, LlmcShards or HFTokens: prepare() makes the token files, load() maps them


def load(cfg: Mapping[str, Any], model_tokenizer: str | None) -> DataSource:
    """The dataset a conf/data/*.yaml names, with the tokenizer to use: the model's (`model_tokenizer`:
    gpt2, a SentencePiece file, or char), or the characters of the text when data.tokenizer=char."""
    config = build_dataclass(DataConfig, cfg, "data")
    loader_name = config.loader or config.name
    if config.shards or loader_name == "hf":
        if config.tokenizer == "char" or model_tokenizer == "char":
            what = "data.shards holds llm.c's GPT-2 tokens" if config.shards else \
                f"data={config.name} tokenizes with the model's tokenizer"
            raise ConfigError(f"{what}, not characters: train a model with a GPT-2 or SentencePiece tokenizer "
                              f"(model=gpt2, or model.tokenizer=gpt2) with data.tokenizer=model")
        tokenizer = _model_tokenizer(model_tokenizer)
        tokens = LlmcShards(config.shards, tokenizer) if config.shards else HFTokens(config, tokenizer)
        return DataSource(config, None, tokenizer, tokens)
    if loader_name not in DATASETS:
        raise ConfigError(f"data.name={loader_name!r} is not a known dataset; choose one of "
                          f"{', '.join([*DATASETS, 'hf'])}")
    loader = DATASETS[loader_name]
    path = {"path": config.path} if config.path is not None else {}
    if path and "path" not in inspect.signature(loader).parameters:
        raise ConfigError(f"data.path is for data=text; data={config.name} does not read a file")
    try:
        splits = loader(config.val_fraction, source=config.source, **path)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if config.tokenizer == "char" or model_tokenizer == "char":
        tokenizer = CharTokenizer.from_text("".join(d for docs in splits.values() for d in docs))
    else:
        tokenizer = _model_tokenizer(model_tokenizer)
    return DataSource(config, splits, tokenizer, DocumentTokens(config, splits, tokenizer))


def _model_tokenizer(spec: str):
    try:
        return load_tokenizer(spec)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"model.tokenizer: {error}") from error


def build(source: DataSource, context_length: int, seed: int = 0) -> TokenDataModule:
    """The data module for a model with this context: windows of data.seq_len tokens (null: the whole context)."""
    seq_len = source.config.seq_len or context_length
    if seq_len > context_length:
        raise ConfigError(f"data.seq_len={seq_len} is longer than the model's context ({context_length}); "
                          f"set data.seq_len<={context_length}")
    return TokenDataModule(source.config, source.tokens, source.tokenizer, seq_len, seed=seed)
