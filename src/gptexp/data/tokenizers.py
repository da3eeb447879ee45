"""Tokenizers: GPT-2 BPE (tiktoken, from the bundled ranks, offline), SentencePiece (LLaMA) and
character-level vocabularies.

Every tokenizer has a `name` that identifies its vocabulary (token files are cached per name),
`vocab_size`, `encode(text) -> list[int]` (no special tokens), `decode(ids) -> str`, and the
special tokens that frame documents: `bos_id` starts each document (LLaMA), `eot_id` separates
documents (GPT-2); either is None when the vocabulary has none.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

import tiktoken

# tiktoken's pattern for the r50k / gpt2 encodings
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_EOT = "<|endoftext|>"


class BPETokenizer:
    """A tiktoken encoding; special tokens in text are encoded as plain text."""

    bos_id = None

    def __init__(self, encoding: tiktoken.Encoding):
        self.encoding = encoding
        self.name = encoding.name
        self.vocab_size = encoding.n_vocab
        self.eot_id = encoding.eot_token

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)


@lru_cache(maxsize=1)
def gpt2_tokenizer() -> BPETokenizer:
    """GPT-2's BPE (50,257 tokens, <|endoftext|> = 50256) built from the ranks bundled in gptexp.assets."""
    ranks_file = resources.files("gptexp.assets") / "gpt2.tiktoken"
    ranks = {base64.b64decode(token): int(rank)
             for token, rank in (line.split() for line in ranks_file.read_bytes().splitlines() if line)}
    encoding = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={GPT2_EOT: len(ranks)})
    return BPETokenizer(encoding)


CHAR_END = "\x03"  # ends an answer in a character vocabulary that holds it (instruction data: ASCII end-of-text)


class CharTokenizer:
    """One token per character of a fixed alphabet (nanoGPT's shakespeare_char); CHAR_END, where the alphabet
    holds it, is its end-of-text token."""

    bos_id = None

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars) or not chars:
            raise ValueError("a character vocabulary needs at least one character, each only once")
        self.chars = chars
        self.vocab_size = len(chars)
        self.name = "char-" + hashlib.sha1(chars.encode()).hexdigest()[:10]
        self._index = {c: i for i, c in enumerate(chars)}
        self.eot_id = self._index.get(CHAR_END)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The sorted set of characters in `text`."""
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[c] for c in text]
        except KeyError as error:
            raise ValueError(f"character {error.args[0]!r} is not in this {self.vocab_size}-character "
                             f"vocabulary (derived from the training text)") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)


class SentencePieceTokenizer:
    """A SentencePiece model file (LLaMA's tokenizer.model, llama2.c's tok512.model); BOS starts each document."""

    eot_id = None

    def __init__(self, model_file: str | os.PathLike | None = None, *, model_bytes: bytes | None = None):
        import sentencepiece

        if model_bytes is None:
            path = Path(model_file)
            if not path.is_file():
                raise FileNotFoundError(f"tokenizer file {path} does not exist")
            model_bytes = path.read_bytes()
        self.model_bytes = model_bytes
        self.processor = sentencepiece.SentencePieceProcessor(model_proto=model_bytes)
        self.name = "sp-" + hashlib.sha1(model_bytes).hexdigest()[:10]
        self.vocab_size = self.processor.get_piece_size()
        self.bos_id = self.processor.bos_id() if self.processor.bos_id() >= 0 else None
        self.eos_id = self.processor.eos_id() if self.processor.eos_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)


def load_tokenizer(spec):
    """`gpt2` (the bundled BPE) or the path of a SentencePiece .model file; a tokenizer already built (the one a
    model's weights bring) is returned as it is."""
    if not isinstance(spec, (str, os.PathLike)):
        return spec
    if str(spec) == "gpt2":
        return gpt2_tokenizer()
    if str(spec).endswith(".model") or Path(spec).is_file():
        return SentencePieceTokenizer(spec)
    raise ValueError(f"unknown tokenizer {str(spec)!r}: use gpt2 or the path of a SentencePiece .model file")


def tokenizer_state(tokenizer) -> dict:
    """What rebuilds `tokenizer` with no file at hand (kept in checkpoints): GPT-2's name, a character
    vocabulary's characters, a SentencePiece model's bytes."""
    if isinstance(tokenizer, CharTokenizer):
        return {"kind": "char", "chars": tokenizer.chars}
    if isinstance(tokenizer, SentencePieceTokenizer):
        return {"kind": "sentencepiece", "model": tokenizer.model_bytes}
    if isinstance(tokenizer, BPETokenizer) and tokenizer.name == "gpt2":
        return {"kind": "gpt2"}
    raise ValueError(f"no way to record tokenizer {tokenizer.name!r}")


def tokenizer_from_state(state: dict):
    """The tokenizer `tokenizer_state` recorded."""
    kind = state.get("kind")
    if kind == "char":
        return CharTokenizer(state["chars"])
    if kind == "sentencepiece":
        return SentencePieceTokenizer(model_bytes=state["model"])
    if kind == "gpt2":
        return gpt2_tokenizer()
    raise ValueError(f"unknown recorded tokenizer kind {kind!r}")


def vocabulary(tokenizer):
    """What the tokenizer's ids stand for, to tell whether two tokenizers share their ids: a SentencePiece model's
    pieces and special ids (the same whether read from its file or rebuilt from a GGUF, whose bytes differ), else
    its recorded state."""
    if isinstance(tokenizer, SentencePieceTokenizer):
        pieces = [tokenizer.processor.id_to_piece(i) for i in range(tokenizer.vocab_size)]
        return pieces, tokenizer.bos_id, tokenizer.eos_id
    return tokenizer_state(tokenizer)


def end_of_text_ids(tokenizer) -> set[int]:
    """The tokens that end a sample: GPT-2's <|endoftext|>; SentencePiece's EOS, and its BOS, which starts the
    next document (llama2.c's models and gptexp's own training put it between documents); none for characters."""
    ids = {tokenizer.eot_id, tokenizer.bos_id, getattr(tokenizer, "eos_id", None)}
    return {i for i in ids if i is not None}


def prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids to start generation from: BOS first where the tokenizer has one; never empty."""
    ids = tokenizer.encode(text)
    if tokenizer.bos_id is not None:
        return [tokenizer.bos_id] + ids
    return ids or [tokenizer.eot_id if tokenizer.eot_id is not None else 0]


def special_texts(tokenizer) -> dict[str, int]:
    """The texts that stand for special tokens where a text is read as its HF tokenizer reads it: GPT-2's
    <|endoftext|>, SentencePiece's <s> and </s>; none for characters (END_MARKER is a character like the others)."""
    if isinstance(tokenizer, BPETokenizer):
        return {tokenizer.decode([tokenizer.eot_id]): tokenizer.eot_id}
    if isinstance(tokenizer, SentencePieceTokenizer):
        ids = (i for i in (tokenizer.bos_id, tokenizer.eos_id) if i is not None)
        return {tokenizer.processor.id_to_piece(i): i for i in ids}
    return {}


def token_text(tokenizer, token: int | None) -> str:
    """The text that stands for `token` in a text read with its special tokens ("" for None)."""
    if token is None:
        return ""
    return {i: text for text, i in special_texts(tokenizer).items()}.get(token) or tokenizer.decode([token])


def encode_with_specials(tokenizer, text: str) -> list[int]:
    """`text`'s tokens, a special token's text in it (special_texts) being that token."""
    specials = special_texts(tokenizer)
    if not any(special in text for special in specials):
        return tokenizer.encode(text)
    pattern = "(" + "|".join(map(re.escape, specials)) + ")"
    return [i for part in re.split(pattern, text) if part
            for i in ([specials[part]] if part in specials else tokenizer.encode(part))]


def continuation_text(tokenizer, prompt: list[int], ids: list[int]) -> str:
    """The text `ids` add after `prompt`: decoded with the prompt (a SentencePiece word's leading space depends on
    what precedes it) and taken past the prompt's own text."""
    prefix, full = tokenizer.decode(prompt), tokenizer.decode(prompt + ids)
    return full[len(prefix):] if full.startswith(prefix) else tokenizer.decode(ids)


class TextStream:
    """A growing text given out in pieces that are whole characters: a tail of U+FFFD (a character whose bytes
    have not all arrived in byte tokens) is held back until it is complete, and so is a tail that may be the start
    of one of `stops` (the strings that will end the text, never given out)."""

    def __init__(self, stops: list[str] | tuple[str, ...] = ()):
        self.given = 0
        self.stops = stops

    def new_text(self, text: str) -> str:
        end = len(text.rstrip("\ufffd"))
        end -= max((size for stop in self.stops for size in range(1, len(stop))
                    if text[:end].endswith(stop[:size])), default=0)
        piece, self.given = text[self.given:end], max(self.given, end)
        return piece
