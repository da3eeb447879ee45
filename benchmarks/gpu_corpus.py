"""A local Parquet corpus for GPU training runs on a machine with no network: the bundled TinyStories sample
and Tiny Shakespeare, repeated (each copy of a document marked with its copy number, so no two documents are
the same) until the text holds about --tokens GPT-2 tokens (4 characters a token, about).

    python benchmarks/gpu_corpus.py <directory> [--tokens 3000000] [--parts 2] [--text FILE]

Writes <directory>/part-<k>.parquet with one column, `text` (data=hf data.column=text), and prints the
document and character counts; --text also writes the documents, blank-line separated, as one UTF-8 file
(data=text data.path=FILE: no `datasets` needed). Used by benchmarks/gpu_check.sh; FineWeb-Edu stands in for nothing here: the
text only has to be real enough to tokenize as English does.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from gptexp.data import tinystories

CHARS_PER_TOKEN = 4.0  # GPT-2's BPE on English prose: a little over 4 characters a token


def documents() -> list[str]:
    """The bundled stories, and Tiny Shakespeare cut at blank lines into pieces of about 2,000 characters."""
    assets = resources.files("gptexp.assets")
    stories = tinystories.stories((assets / "tinystories_sample.txt").read_text(encoding="utf-8"))
    pieces, piece = [], ""
    for speech in (assets / "tinyshakespeare.txt").read_text(encoding="utf-8").split("\n\n"):
        piece = f"{piece}\n\n{speech}" if piece else speech
        if len(piece) >= 2000:
            pieces.append(piece)
            piece = ""
    return stories + pieces + ([piece] if piece else [])


def corpus(tokens: int) -> list[str]:
    base = documents()
    chars = sum(map(len, base))
    copies = max(1, round(tokens * CHARS_PER_TOKEN / chars + 0.5))
    return [doc if k == 0 else f"{doc}\n({k})" for k in range(copies) for doc in base]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--tokens", type=int, default=3_000_000, help="about this many GPT-2 tokens")
    parser.add_argument("--parts", type=int, default=2, help="Parquet files to split the documents into")
    parser.add_argument("--text", type=Path, help="also write the documents as one text file here")
    args = parser.parse_args()
    docs = corpus(args.tokens)
    args.directory.mkdir(parents=True, exist_ok=True)
    size = -(-len(docs) // args.parts)
    for k in range(args.parts):
        part = docs[k * size:(k + 1) * size]
        pq.write_table(pa.table({"text": part}), args.directory / f"part-{k}.parquet")
    if args.text:
        args.text.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    print(f"{len(docs):,} documents, {sum(map(len, docs)):,} characters (about "
          f"{sum(map(len, docs)) / CHARS_PER_TOKEN / 1e6:.1f}M GPT-2 tokens) in {args.parts} Parquet files under "
          f"{args.directory}")


if __name__ == "__main__":
    main()
