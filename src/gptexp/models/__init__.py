"""Language models: plain nn.Modules, free of Lightning and data code."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gptexp.config import ConfigError, build_dataclass, plain
from gptexp.models.base import LanguageModel
from gptexp.models.gpt2 import GPT2, GPT2Config

# arch name in conf/model/*.yaml -> (model class, its config dataclass)
ARCHITECTURES: dict[str, tuple[type[LanguageModel], type]] = {
    "gpt2": (GPT2, GPT2Config),
}
BUILD_KEYS = ("arch", "tokenizer", "pretrained", "compile")  # model keys that are not architecture fields

__all__ = ["ARCHITECTURES", "GPT2", "GPT2Config", "LanguageModel", "build"]


def build(cfg: Mapping[str, Any], vocab_size: int) -> LanguageModel:
    """Build the model a conf/model/*.yaml describes, from scratch or from `pretrained` weights.

    A null `vocab_size` takes the tokenizer's `vocab_size`. With `pretrained`, the architecture
    comes from the checkpoint and only `dropout` from the config.
    """
    cfg = plain(cfg)
    arch = cfg.pop("arch", None)
    if arch not in ARCHITECTURES:
        raise ConfigError(f"model.arch={arch!r} is not a known architecture; choose one of {', '.join(ARCHITECTURES)}")
    model_cls, config_cls = ARCHITECTURES[arch]
    pretrained, compile_model = cfg.pop("pretrained", None), cfg.pop("compile", False)
    cfg.pop("tokenizer", None)
    if cfg.get("vocab_size") is None:
        cfg["vocab_size"] = vocab_size
    config = build_dataclass(config_cls, cfg, "model")
    if pretrained:
        model = model_cls.from_pretrained(pretrained, dropout=config.dropout)
    else:
        model = model_cls(config)
    if vocab_size > model.config.vocab_size:
        raise ConfigError(f"the tokenizer has {vocab_size} tokens but the model only {model.config.vocab_size}; "
                          f"set model.vocab_size=null (the tokenizer's) or use the model's own tokenizer")
    if compile_model:
        model.compile()
    return model
