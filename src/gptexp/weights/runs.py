"""gptexp's own training checkpoints as a model: the architecture and tokenizer a checkpoint records (a
character-level run's characters travel with it; checkpoints written before that take them from the run's saved
config), a LoRA run's adapter folded into its base, a QLoRA run's NF4 base dequantized first."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from omegaconf import OmegaConf

from gptexp import data, finetune
from gptexp.core.config import ConfigError
from gptexp.data.tokenizers import tokenizer_from_state
from gptexp.inference import nf4
from gptexp.models import LanguageModel
from gptexp.weights import checkpoints, pretrained
from gptexp.weights.source import Source, architecture, check_claims, configured


def read(path: Path, overrides: dict | None = None, with_tokenizer: bool = True) -> Source:
    """The model of a .ckpt file with its tokenizer and template. Its weights load into float32 parameters, whatever
    precision the run trained in."""
    state = checkpoints.load(path, fix=checkpoints.READ_FIX)
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise ConfigError(f"{path} is not a training checkpoint (it holds no state_dict); pass a run directory or a "
                          f".ckpt that train.py wrote")
    if "gptexp_model" not in state:
        raise ConfigError(f"{path} does not record its architecture (written before gptexp stored it)")
    spec = state["gptexp_model"]
    if not isinstance(spec, dict) or not isinstance(spec.get("config"), dict):
        raise ConfigError(f"{path} records its architecture as {spec!r}, not as gptexp writes it ({{class, config}})")
    model_cls, config_cls = architecture(spec.get("class"), path)
    try:
        config = configured(config_cls(**spec["config"]), overrides)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{path} records a {model_cls.__name__} config gptexp cannot build: {error}") from None
    weights = {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
    if nf4.is_quantized_state(weights):  # a QLoRA run: its NF4 base, dequantized (the adapter is merged below)
        weights = nf4.dequantized(weights, f"reading {path}, a QLoRA run's checkpoint,")
    base = {re.sub(r"^base_model\.model\.", "", k).replace(".base_layer.", "."): tuple(v.shape)
            for k, v in weights.items() if "lora_" not in k}  # a LoRA run's base weights, by the model's names
    check_claims(config, base, path, {f.name: f"its recorded {f.name}" for f in fields(config)})
    model = model_cls(config)
    if any("lora_" in k for k in weights):
        model = _with_adapter(model, weights, state.get("gptexp_lora") or _run_lora(path), path)
    else:
        model.load_state_dict(weights)
    if not with_tokenizer:
        tokenizer = None
    elif "gptexp_tokenizer" in state:
        tokenizer = tokenizer_from_state(state["gptexp_tokenizer"])
    else:
        tokenizer = _run_tokenizer(path)
    return Source(model.eval(), tokenizer, f"{path} (step {state.get('global_step', '?')})",
                  state.get("gptexp_template"), state.get("gptexp_system"))


def _with_adapter(model: LanguageModel, weights: dict, lora: dict, path: Path) -> LanguageModel:
    """The base model with the checkpoint's LoRA adapter folded into its weights."""
    wrapped = finetune.apply(model, {"method": "lora", "r": lora["r"], "alpha": lora["alpha"], "dropout": 0.0,
                                     "target_modules": list(lora["target_modules"])})
    try:
        wrapped.load_state_dict(weights)
    except RuntimeError as error:
        raise ConfigError(f"{path}: its LoRA weights do not fit the adapter it records: {error}") from error
    return wrapped.merge_and_unload()


def _run_config(path: Path):
    config = path.parent.parent / ".hydra" / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"{path} records no tokenizer and has no run config ({config}) to take it from")
    return OmegaConf.load(config)


def _run_lora(path: Path) -> dict:
    config = _run_config(path).finetune
    return {"r": config.r, "alpha": config.alpha, "target_modules": config.target_modules or ["c_attn"]}


def _run_tokenizer(path: Path):
    """The tokenizer a checkpoint written before checkpoints recorded theirs was trained with."""
    cfg = _run_config(path)
    char = cfg.data.get("tokenizer") == "char"
    spec = "char" if char else pretrained.tokenizer(cfg.model, pretrained.weights_location(cfg.model))
    return data.load(cfg.data, spec).tokenizer
