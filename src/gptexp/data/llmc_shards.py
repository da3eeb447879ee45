"""karpathy/llm.c's token shards: a 256-int32 header (magic, version, token count), then the tokens:
uint16 for GPT-2 (magic 20240520, version 1) and uint32 for vocabularies beyond 65,536 (llm.c's
LLaMA-3 format: magic 20240801, version 7). In llm.c's own shards every document starts with GPT-2's
<|endoftext|>. Shards of a split are named `{name}_{split}_{k:06d}.bin`, as llm.c's dev/data scripts
name them."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from gptexp.core.config import BadInput, ConfigError

HEADER_BYTES = 1024
FORMATS = {np.dtype("<u2"): (20240520, 1), np.dtype("<u4"): (20240801, 7)}  # token type -> (magic, version)
SHARD_MAGIC, SHARD_VERSION = FORMATS[np.dtype("<u2")]


class ShardError(BadInput, ValueError):
    """A file that is not an llm.c token shard, or a pattern that matches none."""


def encode_for_llmc(documents: Iterable[str], tokenizer) -> np.ndarray:
    """llm.c's stream: <|endoftext|> before every document, then its tokens, as uint16."""
    if tokenizer.eot_id is None or tokenizer.vocab_size > 2**16:
        raise ShardError(f"llm.c's shards hold uint16 tokens led by an end-of-text token; the {tokenizer.name} "
                         f"tokenizer has {'no end-of-text token' if tokenizer.eot_id is None else 'ids above 65535'}")
    ids: list[int] = []
    for document in documents:
        ids.append(tokenizer.eot_id)
        ids.extend(tokenizer.encode(document))
    return np.array(ids, dtype=np.uint16)


def write_shard(path: str | os.PathLike, tokens: np.ndarray, dtype: str = "<u2") -> None:
    """Write one shard of `dtype` tokens (uint16, or uint32 for large vocabularies) atomically: a temporary
    file, flushed to disk, renamed into place, so a shard that exists is whole."""
    tokens, dtype = np.asarray(tokens), np.dtype(dtype)
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(dtype).max):
        raise ShardError(f"llm.c's {dtype.name} shards hold token ids in [0, {np.iinfo(dtype).max + 1})")
    header = np.zeros(HEADER_BYTES // 4, dtype="<i4")
    header[:3] = *FORMATS[dtype], len(tokens)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(dtype, copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_split(directory: str | os.PathLike, name: str, split: str, tokens: np.ndarray,
                shard_tokens: int = 10**8) -> list[Path]:
    """A split's tokens as shards of at most `shard_tokens` tokens each."""
    paths = []
    for k, start in enumerate(range(0, max(len(tokens), 1), shard_tokens)):
        paths.append(Path(directory) / f"{name}_{split}_{k:06d}.bin")
        write_shard(paths[-1], tokens[start:start + shard_tokens])
    return paths


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """A shard's tokens, memory-mapped, after checking its header and size."""
    path = Path(path)
    size = path.stat().st_size
    header = np.fromfile(path, dtype="<i4", count=HEADER_BYTES // 4) if size >= HEADER_BYTES else None
    if header is None:
        raise ShardError(f"{path}: {size} bytes is shorter than llm.c's 1024-byte header")
    dtype = next((d for d, (magic, _) in FORMATS.items() if magic == header[0]), None)
    if dtype is None:
        raise ShardError(f"{path}: bad magic {header[0]}, expected {SHARD_MAGIC} (uint16) or "
                         f"{FORMATS[np.dtype('<u4')][0]} (uint32) for an llm.c token shard")
    if header[1] != FORMATS[dtype][1]:
        raise ShardError(f"{path}: shard version {header[1]}, expected {FORMATS[dtype][1]} for magic {header[0]}")
    expected = HEADER_BYTES + dtype.itemsize * int(header[2])
    if size != expected:
        raise ShardError(f"{path}: the header says {header[2]} tokens ({expected} bytes), "
                         f"the file has {size} bytes: truncated or not a shard")
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(int(header[2]),))


def find_shards(prefix: str | os.PathLike, split: str) -> list[Path]:
    """The shards `{prefix}_{split}_*.bin` (llm.c's naming), sorted."""
    prefix = Path(prefix).expanduser()
    paths = sorted(prefix.parent.glob(f"{prefix.name}_{split}_*.bin"))
    if not paths:
        raise ShardError(f"no llm.c token shards match {prefix}_{split}_*.bin; write them with "
                         f"python -m gptexp prepare data=<dataset> output={prefix.parent}")
    return paths


class ShardedTokens:
    """Several shards read as one token array (indexable with integer arrays, as TokenWindows does)."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = shards
        self.starts = np.cumsum([0] + [len(s) for s in shards])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index)
        flat, out = index.ravel(), np.empty(index.size, dtype=self.shards[0].dtype)
        shard_of = np.searchsorted(self.starts, flat, side="right") - 1
        for k in np.unique(shard_of):
            mask = shard_of == k
            out[mask] = self.shards[k][flat[mask] - self.starts[k]]
        return out.reshape(index.shape)


def read_split(prefix: str | os.PathLike, split: str) -> np.ndarray | ShardedTokens:
    return join_shards([read_shard(path) for path in find_shards(prefix, split)])


def join_shards(shards: list[np.ndarray]) -> np.ndarray | ShardedTokens:
    return shards[0] if len(shards) == 1 else ShardedTokens(shards)


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
