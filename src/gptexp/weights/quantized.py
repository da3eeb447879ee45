"""gptexp's quantized model file (export format=quantized): one .safetensors holding a model's int8 / int4 layers
as they are (gptexp.inference.quantize's plain layout), its tokenizer and its template, read back without quantizing
again."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from gptexp.core.config import ConfigError
from gptexp.core.writing import write_atomically
from gptexp.data.tokenizers import tokenizer_from_state, tokenizer_state
from gptexp.inference.quantize import GROUP_SIZES, SCHEMES
from gptexp.weights.source import Source, architecture, assemble

FORMAT = "gptexp-quantized"  # the safetensors metadata's "format" of a saved quantized model
TOKENIZER_TENSOR = "gptexp.tokenizer_model"  # a SentencePiece model's bytes travel as a tensor
OBJECTS = {"model": {"class": str, "config": dict}, "quantization": {"scheme": str, "group_size": (int, type(None))},
           "tokenizer": {"kind": str}}  # the metadata's JSON objects: the fields read from each, and their types
REEXPORT = "export the model again with python -m gptexp export format=quantized"


def write(source: Source, path: str | Path) -> None:
    """Write the quantized model of `source`, its tokenizer and template to one safetensors file."""
    from safetensors.torch import save

    held = getattr(source.model, "quantization", None)
    if not held:
        raise ConfigError("the model is not quantized: place it with quantize=int8 or int4 first")
    tokenizer = tokenizer_state(source.tokenizer)
    tensors = {k: v.contiguous().cpu() for k, v in source.model.state_dict().items()}
    if "model" in tokenizer:
        tensors[TOKENIZER_TENSOR] = torch.frombuffer(bytearray(tokenizer.pop("model")), dtype=torch.uint8)
    spec = {"class": type(source.model).__name__, "config": asdict(source.model.config)}
    metadata = {"format": FORMAT, "model": json.dumps(spec), "quantization": json.dumps(held),
                "tokenizer": json.dumps(tokenizer), "template": json.dumps(source.template),
                "system": json.dumps(source.system), "description": source.description}
    data = save(tensors, metadata=metadata)
    write_atomically(Path(path), lambda f: f.write(data))


def read(path: Path, overrides: dict | None = None, with_tokenizer: bool = True) -> Source:
    """The model `write` wrote: its quantized values loaded as they are."""
    from safetensors.torch import load_file

    metadata = _metadata(path)
    spec, held, tokenizer = metadata["model"], metadata["quantization"], metadata["tokenizer"]
    _, config_cls = architecture(spec["class"], path)
    tensors = load_file(str(path))
    if TOKENIZER_TENSOR in tensors:
        tokenizer["model"] = tensors.pop(TOKENIZER_TENSOR).numpy().tobytes()
    model = assemble(config_cls(**spec["config"]), tensors, path, quantized=held, overrides=overrides)
    return Source(model, tokenizer_from_state(tokenizer) if with_tokenizer else None,
                  f"{metadata['description']}, {held['scheme']} ({path})", metadata["template"], metadata["system"])


def tokenizer(path: Path):
    """The tokenizer a quantized file holds."""
    from safetensors import safe_open

    state = _metadata(path)["tokenizer"]
    if state.get("kind") == "sentencepiece":
        with safe_open(str(path), "pt") as f:
            state["model"] = f.get_tensor(TOKENIZER_TENSOR).numpy().tobytes()
    return tokenizer_from_state(state)


def _metadata(path: Path) -> dict:
    """The metadata `write` wrote, its JSON fields decoded: ConfigError naming the file and the field where one is
    missing or holds something else."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except SafetensorError as error:
        raise ConfigError(f"{path} is not a readable safetensors file ({error}); export format=quantized writes "
                          f"one gptexp reads") from None
    if metadata.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a quantized gptexp model (export format=quantized writes one); for an HF "
                          f"model pass its directory")
    fields = {name: _json_field(metadata, name, path) for name in (*OBJECTS, "template")}
    for name, keys in OBJECTS.items():
        value = fields[name]
        if not (isinstance(value, dict) and all(isinstance(value.get(k), kinds) for k, kinds in keys.items())):
            raise ConfigError(f"{path}: its metadata's {name!r} must be a JSON object with {' and '.join(keys)}, "
                              f"found {metadata[name][:80]}; {REEXPORT}")
    held = fields["quantization"]
    if held["scheme"] not in SCHEMES or held["group_size"] not in (None, *GROUP_SIZES):
        raise ConfigError(f"{path}: its metadata's 'quantization' holds {metadata['quantization'][:80]}, not a scheme "
                          f"of {', '.join(SCHEMES)} with groups of {', '.join(map(str, GROUP_SIZES))} or null; "
                          f"{REEXPORT}")
    if not isinstance(fields["template"], (str, type(None))):
        raise ConfigError(f"{path}: its metadata's 'template' must be a template's name or null, found "
                          f"{metadata['template'][:80]}; {REEXPORT}")
    fields["system"] = _json_field(metadata, "system", path) if "system" in metadata else None  # since 2026-12-07
    if not isinstance(fields["system"], (str, type(None))):
        raise ConfigError(f"{path}: its metadata's 'system' must be a system prompt or null, found "
                          f"{metadata['system'][:80]}; {REEXPORT}")
    return fields | {"description": metadata.get("description", path.name)}


def _json_field(metadata: dict, name: str, path: Path):
    """The JSON value of the metadata's field `name`."""
    if name not in metadata:
        raise ConfigError(f"{path}: its metadata has no {name!r} field; {REEXPORT}")
    try:
        return json.loads(metadata[name])
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: its metadata's {name!r} is not JSON ({error}); {REEXPORT}") from None
