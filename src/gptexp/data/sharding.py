"""Tokenizing a large dataset once, in parallel, into llm.c token shards, resumably.

The documents are read in blocks of BLOCK_ROWS rows; worker processes tokenize whole blocks (each
document led by the tokenizer's BOS, or else its end-of-text token) and hand back their tokens in order,
so the shards are the same whatever the number of processes. A split's tokens go to
`{name}_{split}_{k:06d}.bin` shards of about `shard_tokens` tokens, each ending at a block's end.

Progress is kept in `manifest.json`, rewritten atomically after every shard: the blocks consumed, the
finished shards, and the other splits' unfinished tokens (saved beside it). An interrupted preparation
starts again at the first block it had not consumed; a shard is written to a temporary file and renamed, so
one that exists is whole. `complete: true` marks the end.
"""

from __future__ import annotations

import fcntl
import json
import logging
import multiprocessing
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gptexp.data.llmc_shards import join_shards, read_shard, write_shard
from gptexp.data.token_files import save_atomically, token_dtype
from gptexp.data.tokenizers import BPETokenizer, tokenizer_from_state, tokenizer_state

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # of the manifest and the way documents become tokens
BLOCK_ROWS = 1024  # documents per unit of work


@dataclass
class Summary:
    documents: dict[str, int]
    tokens: dict[str, int]
    shards: dict[str, int]
    seconds: float  # this call's tokenizing (0 when the shards were there already)
    directory: Path
    resumed_at: int = 0  # the block an interrupted preparation started again from (0: from the start)
    blocks: int = 0
    tokenized: int = 0  # tokens this call made (the rest were there when it resumed)

    def split(self, split: str) -> str:
        shards = self.shards[split]
        return f"{split}: {self.documents[split]:,} documents, {self.tokens[split]:,} tokens in {shards} shard" + \
            "s" * (shards != 1)

    def describe(self) -> str:
        return "; ".join(self.split(split) for split in sorted(self.tokens, reverse=True))

    @property
    def tokens_per_second(self) -> float:
        return self.tokenized / self.seconds if self.seconds else 0.0


def blocks(reads) -> list[tuple[int, int, int]]:
    """(read, first row, end row) of every block, in order."""
    return [(r, start, min(start + BLOCK_ROWS, len(read.dataset)))
            for r, read in enumerate(reads) for start in range(0, len(read.dataset), BLOCK_ROWS)]


# --- the workers ---------------------------------------------------------------------------------------------

_work: dict = {}  # what a worker process reads and tokenizes with (set once per process)


def _start_worker(reads, state: dict) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to answer (in one line)
    _work.update(reads=reads, tokenizer=tokenizer_from_state(state))


def encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    if isinstance(tokenizer, BPETokenizer):
        return tokenizer.encoding.encode_ordinary_batch(texts, num_threads=1)
    return [tokenizer.encode(text) for text in texts]


def tokenize_block(block: tuple[int, int, int]) -> dict[str, tuple[np.ndarray, int]]:
    """{split: (tokens, documents)} of one block."""
    r, start, end = block
    read, tokenizer = _work["reads"][r], _work["tokenizer"]
    lead = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eot_id
    texts = [text or "" for text in read.dataset[start:end]["text"]]
    ids: dict[str, list[int]] = {}
    counts: dict[str, int] = {}
    for row, document in enumerate(encode_batch(tokenizer, texts), start):
        split = "val" if read.hold_out and row % read.hold_out == 0 else read.split
        ids.setdefault(split, []).append(lead)
        ids[split].extend(document)
        counts[split] = counts.get(split, 0) + 1
    dtype = token_dtype(tokenizer.vocab_size)
    return {split: (np.array(tokens, dtype=dtype), counts[split]) for split, tokens in ids.items()}


# --- the writer ----------------------------------------------------------------------------------------------

@contextmanager
def exclusive(directory: Path):
    """One preparer per directory at a time (ranks, nodes or sweep jobs sharing a file system wait here)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is preparing %s; waiting for it", directory)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read_manifest(directory: Path) -> dict | None:
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("format") == FORMAT_VERSION else None


def write_manifest(directory: Path, manifest: dict) -> None:
    tmp = directory / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, directory / "manifest.json")


class SplitWriter:
    """A split's shards: tokens collect in memory until a shard's worth is there."""

    def __init__(self, directory: Path, name: str, split: str, state: dict, dtype: np.dtype):
        self.directory, self.name, self.split, self.dtype = directory, name, split, dtype
        self.shards = state.get("shards", [])  # [{"file", "tokens", "documents"}] of the finished shards
        pending = state.get("pending")
        self.parts = [np.load(directory / pending["file"])] if pending else []
        self.pending_documents = pending["documents"] if pending else 0

    def add(self, tokens: np.ndarray, documents: int) -> None:
        self.parts.append(tokens)
        self.pending_documents += documents

    @property
    def pending_tokens(self) -> int:
        return sum(len(p) for p in self.parts)

    def flush(self) -> None:
        """Write what is pending as the next shard."""
        if not self.parts:
            return
        file = f"{self.name}_{self.split}_{len(self.shards):06d}.bin"
        tokens = np.concatenate(self.parts)
        write_shard(self.directory / file, tokens, dtype=self.dtype.newbyteorder("<").str)
        self.shards.append({"file": file, "tokens": len(tokens), "documents": self.pending_documents})
        self.parts, self.pending_documents = [], 0

    def state(self, next_block: int) -> dict:
        """The finished shards, and the pending tokens saved to a file named by the block they reach: what a
        preparation resumed at `next_block` starts from."""
        state = {"shards": self.shards, "pending": None}
        if self.parts:
            file = f"{self.split}.pending-{next_block:09d}.npy"
            self.parts = [np.concatenate(self.parts)]
            save_atomically(self.directory / file, self.parts[0])
            state["pending"] = {"file": file, "documents": self.pending_documents}
        return state


def checkpoint(directory: Path, manifest: dict, writers: dict[str, SplitWriter], next_block: int) -> None:
    """Record that every block before `next_block` is in a shard or a pending file; then drop older pending files."""
    manifest.update(next_block=next_block, splits={s: w.state(next_block) for s, w in writers.items()})
    write_manifest(directory, manifest)
    kept = {v["pending"]["file"] for v in manifest["splits"].values() if v["pending"]}
    for pending in directory.glob("*.pending-*.npy"):
        if pending.name not in kept:
            pending.unlink()


def prepare(directory: Path, name: str, reads, tokenizer, num_proc: int, shard_tokens: int) -> Summary:
    """Tokenize `reads` (hf.Pass) into shards in `directory`, unless they are there; resume a preparation
    that was interrupted."""
    with exclusive(directory):
        manifest = read_manifest(directory)
        if manifest and manifest["complete"]:
            return summary(manifest, directory, 0.0)
        work = blocks(reads)
        manifest = manifest or {"format": FORMAT_VERSION, "complete": False, "next_block": 0, "splits": {}}
        start = manifest["next_block"]
        splits = sorted({r.split for r in reads} | ({"val"} if any(r.hold_out for r in reads) else set()))
        dtype = token_dtype(tokenizer.vocab_size)
        writers = {s: SplitWriter(directory, name, s, manifest["splits"].get(s, {}), dtype) for s in splits}
        if start:
            log.info("resuming the preparation of %s at block %d of %d", directory, start, len(work))
        began = time.perf_counter()
        tokens = had = sum(w.pending_tokens + sum(s["tokens"] for s in w.shards) for w in writers.values())
        bar = tqdm(total=sum(end - begin for _, begin, end in work[start:]), desc=f"tokenizing {name}", unit="doc",
                   unit_scale=True, dynamic_ncols=True, disable=None, file=sys.stderr)
        with _pool(reads, tokenizer, num_proc) as tokenized:
            for k, result in enumerate(tokenized(work[start:]), start):
                for split, (block_tokens, documents) in result.items():
                    writers[split].add(block_tokens, documents)
                    tokens += len(block_tokens)
                full = [w for w in writers.values() if w.pending_tokens >= shard_tokens]
                for writer in full:
                    writer.flush()
                if full:
                    checkpoint(directory, manifest, writers, k + 1)
                bar.update(work[k][2] - work[k][1])
                bar.set_postfix_str(f"{tokens:,} tokens", refresh=False)
        bar.close()
        for writer in writers.values():
            writer.flush()
        manifest["complete"] = True
        checkpoint(directory, manifest, writers, len(work))
        done = summary(manifest, directory, time.perf_counter() - began, resumed_at=start, blocks=len(work),
                       tokenized=tokens - had)
        log.info("prepared %s in %.1f s (%s tokens/s, %d processes): %s", directory, done.seconds,
                 f"{done.tokens_per_second:,.0f}", num_proc, done.describe())
        return done


@contextmanager
def _pool(reads, tokenizer, num_proc: int):
    """A function mapping blocks to their tokens, in order: in this process, or in `num_proc` workers."""
    if num_proc <= 1:
        _work.update(reads=reads, tokenizer=tokenizer)
        yield lambda work: map(tokenize_block, work)
        return
    state = tokenizer_state(tokenizer)
    # fork: the workers share the memory-mapped dataset and the tokenizer with no copying or re-importing
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with context.Pool(num_proc, initializer=_start_worker, initargs=(reads, state)) as pool:
        yield lambda work: pool.imap(tokenize_block, work, chunksize=1)


def summary(manifest: dict, directory: Path, seconds: float, **progress) -> Summary:
    splits = manifest["splits"]
    return Summary(documents={s: sum(x["documents"] for x in v["shards"]) for s, v in splits.items()},
                   tokens={s: sum(x["tokens"] for x in v["shards"]) for s, v in splits.items()},
                   shards={s: len(v["shards"]) for s, v in splits.items()}, seconds=seconds, directory=directory,
                   **progress)


def load(directory: Path) -> dict:
    """{split: tokens} of a finished preparation, memory-mapped."""
    manifest = read_manifest(directory)
    if not manifest or not manifest["complete"]:
        raise FileNotFoundError(f"{directory} holds no finished token shards; prepare them first "
                                f"(python -m gptexp prepare data=<dataset>, or train, which prepares them)")
    return {split: join_shards([read_shard(directory / shard["file"]) for shard in value["shards"]])
            for split, value in manifest["splits"].items() if value["shards"]}
