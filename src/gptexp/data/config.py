"""The data config (conf/data/*.yaml), checked: one dataclass for every kind of data a run trains on."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from gptexp.core.config import CACHE_DIR


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
