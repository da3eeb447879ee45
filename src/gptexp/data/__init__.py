"""Datasets as token files, the tokenizers that make them, and the LightningDataModule that serves them."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gptexp.core.config import ConfigError, build_dataclass
from gptexp.data import shakespeare, text_file, tinystories
from gptexp.data.config import DataConfig
from gptexp.data.hf import HFTokens
from gptexp.data.llmc_shards import LlmcShards
from gptexp.data.token_files import DocumentTokens
from gptexp.data.tokenizers import CharTokenizer, gpt2_tokenizer, load_tokenizer

# data.loader (or data.name) in conf/data/*.yaml -> function(val_fraction, source[, path]) -> {"train": [documents],
# "val": [documents]}; data.loader=hf reads any Hugging Face dataset instead (gptexp.data.hf), data.loader=instruct
# instruction, chat and preference records (gptexp.data.instruct)
DATASETS: dict[str, Callable[..., dict[str, list[str]]]] = {
    "shakespeare": shakespeare.load_splits,
    "tinystories": tinystories.load_splits,
    "text": text_file.load_splits,
}

__all__ = ["DATASETS", "DataConfig", "DataSource", "HFTokens", "CharTokenizer", "gpt2_tokenizer",
           "load", "build"]


@dataclass
class DataSource:
    config: DataConfig
    splits: dict[str, list[str]] | None  # documents per split; None when shards or records give the tokens
    tokenizer: Any
    tokens: Any  # DocumentTokens, LlmcShards, HFTokens or InstructExamples: prepare() makes the token files

    @property
    def kind(self) -> str:
        """windows (a corpus), examples (instruction data) or pairs (preference data)."""
        if self.config.loader != "instruct":
            return "windows"
        return "pairs" if self.tokens.pairs else "examples"

    @property
    def template(self) -> str | None:
        """The template instruction data is written in (None for a corpus)."""
        return self.tokens.template.name if self.config.loader == "instruct" else None

    @property
    def system(self) -> str | None:
        """The system prompt given to conversations without one (data.system; None for a corpus)."""
        return self.config.system if self.config.loader == "instruct" else None


def load(cfg: Mapping[str, Any], model_tokenizer: Any, template: str | None = None) -> DataSource:
    """The dataset a conf/data/*.yaml names, with the tokenizer to use: the model's (`model_tokenizer`: a tokenizer,
    or gpt2, a SentencePiece file, or char), or the characters of the text when data.tokenizer=char. `template`:
    the one instruction data is written in when a run already has one (data.template otherwise)."""
    config = build_dataclass(DataConfig, cfg, "data")
    loader_name = config.loader or config.name
    if loader_name == "instruct":
        from gptexp.data.instruct import InstructExamples

        examples = InstructExamples(config, template)
        if config.tokenizer == "char" or model_tokenizer == "char":
            tokenizer = CharTokenizer.from_text(examples.vocabulary_text())
        else:
            tokenizer = _model_tokenizer(model_tokenizer)
        return DataSource(config, None, tokenizer, examples.use(tokenizer))
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


def batch_inputs(batch):
    """The (B, T) input ids of any training batch: (x, y) windows, or an instruction or preference batch's dict;
    None for a batch of prompts (finetune=grpo), whose inputs the policy writes during the step."""
    return batch.get("x") if isinstance(batch, dict) else batch[0]


def _model_tokenizer(spec):
    try:
        return load_tokenizer(spec)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"model.tokenizer: {error}") from error


def build(source: DataSource, context_length: int, seed: int = 0, rounds: int | None = None):
    """The data module for a model with this context: windows of data.seq_len tokens (null: the whole context),
    batches of whole examples of at most that many, or with `rounds` (finetune=grpo's num_iterations) batches of the
    examples' prompts, for a policy to answer, each round's prompts for that many optimizer steps."""
    seq_len = source.config.seq_len or context_length
    if seq_len > context_length:
        raise ConfigError(f"data.seq_len={seq_len} is longer than the model's context ({context_length}); "
                          f"set data.seq_len<={context_length}")
    # the data modules import Lightning, which only training needs (sample and evaluate start without it)
    if rounds is not None and source.kind == "examples":
        from gptexp.data.prompt_batches import PromptDataModule

        return PromptDataModule(source.config, source.tokens, seq_len, seed=seed, iterations=rounds)
    if source.kind != "windows":
        from gptexp.data.example_batches import ExampleDataModule

        return ExampleDataModule(source.config, source.tokens, seq_len, seed=seed)
    from gptexp.data.datamodule import TokenDataModule

    return TokenDataModule(source.config, source.tokens, source.tokenizer, seq_len, seed=seed)
