"""What a path or hub id names: the one place gptexp decides which reader a model's weights go to, for source=,
finetune.init_from=, model.pretrained= and model.checkpoint= alike, and each kind's reader."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from gptexp.core.config import ConfigError
from gptexp.weights import gguf, hf, hub, llama2c, llmc, meta, quantized

TAKES = ("a run directory (checkpoints/best.ckpt or last.ckpt)", "a .ckpt file",
         "a quantized .safetensors (export format=quantized)", "a .gguf file (llama.cpp's; gpt2 or llama)",
         "a Hugging Face directory (config.json) or hub id", "a Meta directory (params.json)", "a llama2.c .bin",
         "an llm.c model .bin")  # what a path may be, for the messages
SUFFIXES = {".ckpt": "checkpoint", ".safetensors": "quantized", ".gguf": "gguf"}
# each kind's reader: read(path, overrides, with_tokenizer) -> Source, and tokenizer(path); a gptexp checkpoint's is
# gptexp.weights.runs (it reads a run's own config through gptexp.weights.pretrained)
READERS = {"hf": hf, "meta": meta, "llama2c": llama2c, "llmc": llmc, "gguf": gguf, "quantized": quantized}


@dataclass(frozen=True)
class Location:
    """Weights found: their `kind` (checkpoint, quantized, gguf, hf, meta, llama2c, llmc) and the local `path` of
    the file or directory to read; `option` is what the user typed (key=spec), for messages."""

    kind: str
    path: Path
    option: str


def locate(spec: str, key: str = "source", checkpoint: str = "best") -> Location:
    """Decide what `spec` names: a run directory (its `checkpoint`, best or last; a run that never validated keeps
    only last), a training checkpoint, gptexp's quantized file, a GGUF file, an HF directory, a Meta directory, a
    llama2.c or llm.c .bin, or else a hub id (fetched into HF's cache, then an HF directory). Raises ConfigError naming
    `key` (the option that named it) and what it takes."""
    option, path = f"{key}={spec}", Path(spec).expanduser()
    if checkpoint not in ("best", "last"):
        raise ConfigError(f"checkpoint={checkpoint!r}: choose best or last")
    if path.is_dir():
        if (path / "checkpoints").is_dir():
            return Location("checkpoint", _run_checkpoint(path, checkpoint), option)
        found = _directory_kind(path)
        if found:
            return Location(found, path, option)
    elif path.is_file():
        if path.suffix in SUFFIXES:
            return Location(SUFFIXES[path.suffix], path, option)
        if path.suffix == ".bin":
            return Location("llmc" if _magic(path) == llmc.MODEL_MAGIC else "llama2c", path, option)
    elif hub.is_hub_id(spec):
        try:
            directory = hub.snapshot(spec)
        except FileNotFoundError as error:
            raise ConfigError(f"{option}: not a local path, so it was taken for a hub id: {error}") from None
        return Location(_directory_kind(directory) or "hf", directory, option)
    what = "does not exist" if not path.exists() else "is none of the formats"
    raise ConfigError(f"{option} {what}; pass {', '.join(TAKES[:-1])} or {TAKES[-1]}")


def _run_checkpoint(run: Path, checkpoint: str) -> Path:
    path = run / "checkpoints" / f"{checkpoint}.ckpt"
    if not path.is_file() and checkpoint == "best" and (run / "checkpoints" / "last.ckpt").is_file():
        path = run / "checkpoints" / "last.ckpt"  # a run that never validated keeps only its last step
    if not path.is_file():
        raise ConfigError(f"{run}/checkpoints holds no {checkpoint}.ckpt; pass checkpoint=last or another run")
    return path


def _directory_kind(path: Path) -> str | None:
    if (path / "params.json").is_file():
        return "meta"
    if (path / "config.json").is_file():
        return "hf"
    return None


def _magic(path: Path) -> int | None:
    with open(path, "rb") as f:
        head = f.read(4)
    return struct.unpack("<i", head)[0] if len(head) == 4 else None
