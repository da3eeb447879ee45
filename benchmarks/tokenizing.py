"""Tokenizing a corpus into shards: gptexp's data=hf preparation against nanoGPT's prepare.py recipe.

    python benchmarks/tokenizing.py [--megabytes 50] [--num-proc 1 2] [--repeats 2]

The corpus: the bundled TinyStories sample, its stories repeated (each copy numbered, so no two documents
are equal) to about --megabytes of UTF-8 text, written as Parquet. For each process count, interleaved
over --repeats rounds, in fresh cache directories:

- gptexp: `gptexp.data.sharding.prepare` through data=hf (blocks of documents tokenized by worker
  processes, written as llm.c shards with a held-out validation split);
- nanoGPT's recipe, written here from its description: `datasets.map` calling tiktoken's `encode_ordinary`
  per document with `num_proc` processes, then every document's tokens concatenated into one uint16 file.

Both count from a loaded dataset (the Parquet file read once before timing) to the last token on disk, and
both tokenize with the same bundled GPT-2 BPE. Prints tokens/s and the speed-up of N processes over one.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gptexp.data import hf, sharding, tinystories  # noqa: E402
from gptexp.data.config import DataConfig  # noqa: E402
from gptexp.data.tokenizers import gpt2_tokenizer  # noqa: E402


def corpus(directory: Path, megabytes: float) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    stories = tinystories.stories((resources.files("gptexp.assets") / "tinystories_sample.txt").read_text())
    size = sum(len(s.encode()) for s in stories)
    copies = max(1, round(megabytes * 1e6 / size))
    documents = [f"{story}\n\n(Story {copy * len(stories) + i})" for copy in range(copies)
                 for i, story in enumerate(stories)]
    path = directory / "tinystories_repeated.parquet"
    pq.write_table(pa.table({"text": documents}), path, row_group_size=8192)
    return path


def gptexp_prepare(parquet: Path, cache: Path, num_proc: int) -> tuple[int, float]:
    config = DataConfig(name="bench", loader="hf", files=str(parquet), cache_dir=str(cache), num_proc=num_proc,
                        val_fraction=0.001)
    tokens = hf.HFTokens(config, gpt2_tokenizer())
    directory = tokens.directory  # loads the dataset: outside the timing, as the reference's load is
    began = time.perf_counter()
    done = sharding.prepare(directory, config.name, tokens.reads, tokens.tokenizer, num_proc, config.shard_tokens)
    seconds = time.perf_counter() - began
    return sum(done.tokens.values()), seconds


def nanogpt_prepare(parquet: Path, cache: Path, num_proc: int) -> tuple[int, float]:
    import datasets

    dataset = datasets.load_dataset("parquet", data_files={"train": str(parquet)}, split="train",
                                    cache_dir=str(cache / "hf"))
    encoding = gpt2_tokenizer().encoding

    def process(example):
        ids = encoding.encode_ordinary(example["text"])
        ids.append(encoding.eot_token)
        return {"ids": ids, "len": len(ids)}

    began = time.perf_counter()
    tokenized = dataset.map(process, remove_columns=["text"], num_proc=num_proc if num_proc > 1 else None,
                            desc="nanoGPT recipe")
    n = int(np.sum(tokenized["len"], dtype=np.uint64))
    out = np.memmap(cache / "train.bin", dtype=np.uint16, mode="w+", shape=(n,))
    at, shards = 0, 64
    for k in range(shards):
        part = tokenized.shard(num_shards=shards, index=k, contiguous=True).with_format("numpy")
        ids = np.concatenate(part["ids"]) if len(part) else np.empty(0, np.uint16)
        out[at:at + len(ids)] = ids
        at += len(ids)
    out.flush()
    return n, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=50)
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import datasets

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        parquet = corpus(Path(tmp), args.megabytes)
        texts = datasets.load_dataset("parquet", data_files=str(parquet), split="train")["text"]
        print(f"corpus: {parquet.stat().st_size / 1e6:.1f} MB of Parquet, {len(texts):,} documents, "
              f"{sum(len(t.encode()) for t in texts) / 1e6:.1f} MB of text")
        rates: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.repeats):
            for num_proc in args.num_proc:
                for name, run in (("gptexp", gptexp_prepare), ("nanoGPT recipe", nanogpt_prepare)):
                    cache = Path(tempfile.mkdtemp(dir=tmp))
                    tokens, seconds = run(parquet, cache, num_proc)
                    rates.setdefault((name, num_proc), []).append(tokens / seconds)
                    print(f"  {name:15s} num_proc={num_proc}: {tokens:,} tokens in {seconds:.2f} s", flush=True)
                    shutil.rmtree(cache)
        print(f"\n{'':15s} {'processes':>9s} {'tokens/s (median)':>18s} {'vs 1 process':>13s}")
        for name in ("gptexp", "nanoGPT recipe"):
            base = statistics.median(rates[(name, args.num_proc[0])])
            for num_proc in args.num_proc:
                rate = statistics.median(rates[(name, num_proc)])
                print(f"{name:15s} {num_proc:9d} {rate:18,.0f} {rate / base:12.2f}x")
        for num_proc in args.num_proc:
            ours, theirs = (statistics.median(rates[(name, num_proc)]) for name in ("gptexp", "nanoGPT recipe"))
            print(f"gptexp / nanoGPT recipe at num_proc={num_proc}: {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
