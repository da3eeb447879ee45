"""Token files: tokenize a dataset's splits once into compact .npy arrays, then memory-map them; DocumentTokens, the
tokens of documents held in memory, through them."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from gptexp.core.writing import write_atomically

log = logging.getLogger(__name__)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token id."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def encode_documents(documents: list[str], tokenizer) -> np.ndarray:
    """Concatenate the documents' tokens: BOS before each document where the tokenizer has one
    (LLaMA), else its end-of-text token between documents (GPT-2)."""
    ids: list[int] = []
    for i, document in enumerate(documents):
        if tokenizer.bos_id is not None:
            ids.append(tokenizer.bos_id)
        elif i and tokenizer.eot_id is not None:
            ids.append(tokenizer.eot_id)
        ids.extend(tokenizer.encode(document))
    return np.array(ids, dtype=token_dtype(tokenizer.vocab_size))


def save_atomically(path: Path, array: np.ndarray) -> None:
    """np.save into `path` atomically (write_atomically): readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda f: np.save(f, array))


def tokenize_once(directory: Path, splits: dict[str, list[str]], tokenizer) -> dict[str, Path]:
    """Write `<split>.npy` for each split into `directory` unless already there; return their paths.

    `meta.json` is written last, so its presence marks a complete cache.
    """
    paths = {split: directory / f"{split}.npy" for split in splits}
    meta = directory / "meta.json"
    if meta.exists() and all(p.exists() for p in paths.values()):
        return paths
    counts = {}
    for split, documents in splits.items():
        tokens = encode_documents(documents, tokenizer)
        save_atomically(paths[split], tokens)
        counts[split] = len(tokens)
        log.info("tokenized %s: %d documents -> %d %s tokens in %s", split, len(documents), len(tokens),
                 tokenizer.name, paths[split])
    tmp = meta.with_suffix(".tmp")
    tmp.write_text(json.dumps({"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, "tokens": counts}))
    os.replace(tmp, meta)
    return paths


def load_tokens(path: Path) -> np.ndarray:
    """Memory-map a token file written by `tokenize_once`."""
    return np.load(path, mmap_mode="r")


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

    def __init__(self, config, splits: dict[str, list[str]], tokenizer):
        self.splits, self.tokenizer = splits, tokenizer
        self.directory = Path(config.cache_dir).expanduser() / f"{config.name}-{fingerprint(splits)}" / tokenizer.name

    def prepare(self) -> None:
        tokenize_once(self.directory, self.splits, self.tokenizer)

    def load(self) -> dict:
        return {split: load_tokens(path) for split, path in tokenize_once(self.directory, self.splits,
                                                                          self.tokenizer).items()}
