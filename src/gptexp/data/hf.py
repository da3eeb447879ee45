"""Any dataset the Hugging Face `datasets` library reads (data=hf), tokenized once into llm.c token shards.

The text comes from a hub id (data.path, data.subset, data.split, data.column) or from local files
(data.files: a glob of .jsonl / .json, .parquet or .txt files, a .txt file being one document). The
validation split is data.val_split of the hub dataset, or data.val_files, when given; otherwise it is
held out by this rule: every k-th document of the training split validates, k = round(1 / data.val_fraction),
counting from the first, and the other documents train.

Tokenizing runs in data.num_proc processes (gptexp.data.sharding); the shards live in a directory named
by a fingerprint of the data (the `datasets` fingerprint of each split: its files and their versions),
the column, the hold-out rule, the shard size and the tokenizer, so changing any of them makes new shards.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from gptexp.core.config import ConfigError
from gptexp.data import sharding

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}  # suffix -> builder


@dataclass
class Pass:
    """One read through a dataset: its documents go to `split`, except every `hold_out`-th, which validates."""

    dataset: object  # a datasets.Dataset of one column
    split: str
    hold_out: int | None = None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")


def check_hub_reachable(dataset: str) -> None:
    """Fail at once, in one line, when the hub cannot be reached (the `datasets` library would retry for half
    a minute): offline a hub dataset is read only from its local copy."""
    fix = ("use local copies with data.files=<glob of .parquet / .jsonl / .txt files> (and data.path=null), or set "
           "HF_HUB_OFFLINE=1 to read a copy the datasets library cached before")
    if hub_offline():
        return  # datasets then reads its cache, or says at once that it has none
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=10)
    except urllib.error.HTTPError:
        return  # the hub answered
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ConfigError(f"data.path={dataset}: the Hugging Face hub ({endpoint}) cannot be reached ({reason}); "
                          f"{fix}") from None


def local_files(pattern: str, key: str) -> tuple[str, list[str]]:
    """The files a glob names, and the `datasets` builder that reads them."""
    files = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise ConfigError(f"{key}={pattern} matches no files; give a glob of .parquet, .jsonl, .json or .txt files")
    kinds = {BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds or len(kinds) > 1:
        suffixes = sorted({Path(f).suffix or "(none)" for f in files})
        raise ConfigError(f"{key}={pattern} matches files ending {', '.join(suffixes)}; data=hf reads one kind at a "
                          f"time: .parquet, .jsonl / .json, or .txt")
    return kinds.pop(), files


def load_split(config, split: str, files: str | None, key: str):
    """One split (of the hub dataset, or the local files that `key` names) as a one-column datasets.Dataset."""
    import datasets

    datasets.logging.set_verbosity_error()
    try:
        if files is not None:
            builder, paths = local_files(files, key)
            kwargs = {"sample_by": "document"} if builder == "text" else {}
            dataset = datasets.load_dataset(builder, data_files={"data": paths}, split="data", **kwargs)
        else:
            dataset = datasets.load_dataset(config.path, config.subset, split=split)
    except ConfigError:
        raise
    except (ConnectionError, FileNotFoundError, ValueError) as error:
        where = f"{key}={files}" if files is not None else f"data.path={config.path}"
        if files is None and key == "data.val_split" and "split" in str(error).lower():
            raise ConfigError(f"{where} has no split {split!r} ({error}); set data.val_split=null to hold out "
                              f"documents of {config.split!r} instead") from None
        hint = ("; offline (HF_HUB_OFFLINE=1), use local copies with data.files=<glob of .parquet / .jsonl / .txt "
                "files> and data.path=null" if files is None and hub_offline() else "")
        raise ConfigError(f"{where}: {str(error).splitlines()[0]}{hint}") from None
    column = "text" if files is not None and builder == "text" else config.column
    if column not in dataset.column_names:
        raise ConfigError(f"data.column={column!r} is not a column of {config.path or files}; its columns: "
                          f"{', '.join(dataset.column_names)}")
    kinds = {name: getattr(feature, "dtype", type(feature).__name__) for name, feature in dataset.features.items()}
    if kinds[column] not in ("string", "large_string"):
        raise ConfigError(f"data.column={column!r} of {config.path or files} holds {kinds[column]}, not text; its "
                          f"columns: {', '.join(f'{name} ({kind})' for name, kind in kinds.items())}")
    dataset = dataset.select_columns([column])
    return dataset.rename_column(column, "text") if column != "text" else dataset


def passes(config) -> list[Pass]:
    """The reads that make the train and val splits (validation first: it is small, and then done)."""
    if config.path is None and config.files is None:
        raise ConfigError("data=hf reads a dataset: set data.path=<hub id> (with data.subset, data.split) or "
                          "data.files=<glob of local .parquet / .jsonl / .txt files>")
    if config.path is not None and config.files is not None:
        raise ConfigError(f"data.path={config.path} and data.files={config.files} both name the text; set one "
                          f"(data.path=null for local files)")
    if config.files is None:
        check_hub_reachable(config.path)
    train = load_split(config, config.split, config.files, "data.files")
    if config.val_files is not None:
        return [Pass(load_split(config, "val", config.val_files, "data.val_files"), "val"), Pass(train, "train")]
    if config.files is None and config.val_split is not None:
        return [Pass(load_split(config, config.val_split, None, "data.val_split"), "val"), Pass(train, "train")]
    return [Pass(train, "train", hold_out=max(2, round(1 / config.val_fraction)))]


def fingerprint(reads: list[Pass], tokenizer, shard_tokens: int) -> str:
    """What the shards are made of: the splits' `datasets` fingerprints (their files' versions), the hold-out
    rule, the shard size and the tokenizer's vocabulary."""
    described = {"format": sharding.FORMAT_VERSION, "tokenizer": tokenizer.name, "shard_tokens": shard_tokens,
                 "reads": [[p.split, p.hold_out, p.dataset._fingerprint, len(p.dataset)] for p in reads]}
    return hashlib.sha1(json.dumps(described).encode()).hexdigest()[:12]


class HFTokens:
    """The token shards of a data=hf dataset (opened, or downloaded once, when made): made by prepare() once,
    memory-mapped by load()."""

    def __init__(self, config, tokenizer):
        self.config, self.tokenizer = config, tokenizer
        if tokenizer.bos_id is None and tokenizer.eot_id is None:
            raise ConfigError(f"data=hf separates documents with an end-of-text or BOS token, which the "
                              f"{tokenizer.name} tokenizer lacks: train a model with a GPT-2 or SentencePiece "
                              f"tokenizer (e.g. model=gpt2), not characters")
        self.reads = passes(config)
        key = fingerprint(self.reads, tokenizer, config.shard_tokens)
        self.directory = Path(config.cache_dir).expanduser() / f"{config.name}-{key}" / tokenizer.name

    def prepare(self) -> sharding.Summary:
        return sharding.prepare(self.directory, self.config.name, self.reads, self.tokenizer,
                                num_proc=self.config.num_proc or len(os.sched_getaffinity(0)),
                                shard_tokens=self.config.shard_tokens)

    def load(self) -> dict:
        return sharding.load(self.directory)
