"""The model a conf/model/*.yaml describes: built from scratch, or from the weights its `pretrained` (GPT-2) or
`checkpoint` (LLaMA) key names, found by the same `locate` as source= and read by the same readers."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from gptexp.core.config import BadInput, ConfigError, build_dataclass, plain
from gptexp.models import ARCHITECTURES, LanguageModel
from gptexp.weights.locate import READERS, Location, locate

log = logging.getLogger(__name__)

WEIGHTS_KEYS = ("pretrained", "checkpoint")  # where a model's weights come from (GPT-2 / LLaMA configs)
BUILD_KEYS = ("arch", "tokenizer", "compile", "activation_checkpointing", *WEIGHTS_KEYS)
MODEL_OPTIONS = {"gpt2": "model=gpt2", "llama": "model=llama2"}  # the config group option of each architecture
HINTS = {"llama": "Or run the bundled pretrained tiny LLaMA: model=llama2_260k."}  # when weights cannot be found


def weights_location(cfg: Mapping[str, Any]) -> Location | None:
    """Where the weights model.pretrained / model.checkpoint names are, or None for a model built from scratch.
    A gptexp run is refused here: finetune.init_from starts from one."""
    key, spec = _weights(cfg)
    if not spec:
        return None
    try:
        location = locate(str(spec), f"model.{key}")
    except ConfigError as error:
        raise ConfigError(f"{error} {HINTS.get(cfg.get('arch'), '')}".rstrip()) from None
    if location.kind == "checkpoint":
        raise ConfigError(f"model.{key}={spec} is a gptexp run; start from it with finetune.init_from={spec}")
    if location.kind == "quantized":
        raise ConfigError(f"model.{key}={spec} is a quantized model, which decodes but does not train; start from "
                          f"the run or weights it was quantized from")
    return location


def tokenizer(cfg: Mapping[str, Any], location: Location | None):
    """The model's tokenizer: model.tokenizer when set (a spec: gpt2 or a SentencePiece file), else the one that
    comes with its weights (read without reading the weights)."""
    if cfg.get("tokenizer"):
        return str(cfg["tokenizer"])
    if location is None:
        key, _ = _weights(cfg)
        raise ConfigError(f"model.tokenizer is not set and there is no model.{key} to take it from; "
                          f"set model.tokenizer=<gpt2 or a SentencePiece .model file>")
    try:
        return READERS[location.kind].tokenizer(location.path)
    except FileNotFoundError as error:
        raise ConfigError(f"{location.option}: {error} {HINTS.get(cfg.get('arch'), '')}".rstrip()) from None


def build(cfg: Mapping[str, Any], vocab_size: int, location: Location | None = None) -> LanguageModel:
    """Build the model a conf/model/*.yaml describes, from scratch or from the weights at `location`
    (weights_location). A null `vocab_size` takes the tokenizer's `vocab_size`. With weights, the architecture comes
    from them; keys that disagree with it are reported and ignored."""
    cfg = plain(cfg)
    model_cls, config_cls = _architecture(cfg)
    options = {k: cfg.pop(k, None) for k in BUILD_KEYS}
    if cfg.get("vocab_size") is None:
        cfg["vocab_size"] = vocab_size
    config = build_dataclass(config_cls, cfg, "model")
    if location is not None:
        model = _read(location, config, model_cls)
        for name, value in asdict(config).items():
            if name != "vocab_size" and value != getattr(model.config, name):
                log.warning("model.%s=%s ignored: the checkpoint has %s", name, value, getattr(model.config, name))
    else:
        model = model_cls(config)
    if vocab_size > model.config.vocab_size:
        raise ConfigError(f"the tokenizer has {vocab_size} tokens but the model only {model.config.vocab_size}; "
                          f"set model.vocab_size=null (the tokenizer's) or use the model's own tokenizer")
    model.activation_checkpointing = bool(options["activation_checkpointing"])
    if options["compile"]:
        model.compile()
    return model


def _read(location: Location, config: Any, model_cls: type[LanguageModel]) -> LanguageModel:
    try:
        model = READERS[location.kind].read(location.path, {"dropout": getattr(config, "dropout", 0.0)},
                                            with_tokenizer=False).model
    except BadInput:
        raise
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"{location.option}: {error}") from error
    if not isinstance(model, model_cls):
        arch = next(name for name, (cls, _) in ARCHITECTURES.items() if isinstance(model, cls))
        raise ConfigError(f"{location.option} holds a {type(model).__name__}, not a {model_cls.__name__}; use "
                          f"{MODEL_OPTIONS[arch]}")
    return model.train()


def _weights(cfg: Mapping[str, Any]) -> tuple[str, Any]:
    key = next((k for k in WEIGHTS_KEYS if k in cfg), "pretrained")
    return key, cfg.get(key)


def _architecture(cfg: Mapping[str, Any]) -> tuple[type[LanguageModel], type]:
    arch = cfg.get("arch")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"model.arch={arch!r} is not a known architecture; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]
