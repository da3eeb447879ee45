"""Datasets as token files, the tokenizers that make them, and the LightningDataModule that serves them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from gptexp.config import ConfigError, build_dataclass
from gptexp.data import shakespeare
from gptexp.data.datamodule import DataConfig, TokenDataModule
from gptexp.data.tokenizers import CharTokenizer, gpt2_tokenizer, tokenizer_by_name

# data.name in conf/data/*.yaml -> function(val_fraction) returning {"train": [documents], "val": [documents]}
DATASETS: dict[str, Callable[[float], dict[str, list[str]]]] = {
    "shakespeare": shakespeare.load_splits,
}

__all__ = ["DATASETS", "DataConfig", "TokenDataModule", "CharTokenizer", "gpt2_tokenizer", "build"]


def build(cfg: Mapping[str, Any], model_tokenizer: str, seed: int = 0) -> TokenDataModule:
    """The data module a conf/data/*.yaml describes, with its tokenizer: the model's, or the
    characters of the text when data.tokenizer is `char`."""
    config = build_dataclass(DataConfig, cfg, "data")
    if config.name not in DATASETS:
        raise ConfigError(f"data.name={config.name!r} is not a known dataset; choose one of {', '.join(DATASETS)}")
    splits = DATASETS[config.name](config.val_fraction)
    if config.tokenizer == "char":
        tokenizer = CharTokenizer.from_text("".join(doc for docs in splits.values() for doc in docs))
    else:
        try:
            tokenizer = tokenizer_by_name(model_tokenizer)
        except ValueError as error:
            raise ConfigError(f"model.tokenizer: {error}") from error
    return TokenDataModule(config, splits, tokenizer, seed=seed)
