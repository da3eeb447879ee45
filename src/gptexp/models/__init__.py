"""Language models: plain nn.Modules, free of Lightning and data code."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from gptexp.config import ConfigError, build_dataclass, plain
from gptexp.models.base import LanguageModel
from gptexp.models.gpt2 import GPT2, GPT2Config
from gptexp.models.llama import Llama, LlamaConfig

log = logging.getLogger(__name__)

# arch name in conf/model/*.yaml -> (model class, its config dataclass)
ARCHITECTURES: dict[str, tuple[type[LanguageModel], type]] = {
    "gpt2": (GPT2, GPT2Config),
    "llama": (Llama, LlamaConfig),
}
WEIGHTS_KEYS = ("pretrained", "checkpoint")  # where a model's weights come from (GPT-2 / LLaMA configs)
BUILD_KEYS = ("arch", "tokenizer", "compile", "activation_checkpointing", *WEIGHTS_KEYS)

__all__ = ["ARCHITECTURES", "GPT2", "GPT2Config", "LanguageModel", "Llama", "LlamaConfig", "build", "tokenizer_spec"]


def _weights(cfg: Mapping[str, Any]) -> tuple[str, Any]:
    key = next((k for k in WEIGHTS_KEYS if k in cfg), "pretrained")
    return key, cfg.get(key)


def _architecture(cfg: Mapping[str, Any]) -> tuple[type[LanguageModel], type]:
    arch = cfg.get("arch")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"model.arch={arch!r} is not a known architecture; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def tokenizer_spec(cfg: Mapping[str, Any]) -> str:
    """The model's tokenizer: model.tokenizer when set, else the one that comes with its weights."""
    if cfg.get("tokenizer"):
        return str(cfg["tokenizer"])
    model_cls, _ = _architecture(cfg)
    key, weights = _weights(cfg)
    if not weights:
        raise ConfigError(f"model.tokenizer is not set and there is no model.{key} to take it from; "
                          f"set model.tokenizer=<gpt2 or a SentencePiece .model file>")
    try:
        return model_cls.tokenizer_for(weights)
    except FileNotFoundError as error:
        raise ConfigError(f"model.{key}={weights}: {error} {model_cls.weights_hint}".rstrip()) from error


def build(cfg: Mapping[str, Any], vocab_size: int) -> LanguageModel:
    """Build the model a conf/model/*.yaml describes, from scratch or from its weights (`pretrained` or
    `checkpoint`). A null `vocab_size` takes the tokenizer's `vocab_size`. With weights, the architecture
    comes from the checkpoint; keys that disagree with it are reported and ignored."""
    cfg = plain(cfg)
    model_cls, config_cls = _architecture(cfg)
    key, weights = _weights(cfg)
    options = {k: cfg.pop(k, None) for k in BUILD_KEYS}
    if cfg.get("vocab_size") is None:
        cfg["vocab_size"] = vocab_size
    config = build_dataclass(config_cls, cfg, "model")
    if weights:
        try:
            model = model_cls.from_pretrained(weights, **({"dropout": config.dropout} if hasattr(config, "dropout") else {}))
        except FileNotFoundError as error:
            raise ConfigError(f"model.{key}={weights}: {error} {model_cls.weights_hint}".rstrip()) from error
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
