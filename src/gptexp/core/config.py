"""Turning composed Hydra configs into typed objects, with errors that name the key and the fix."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

T = TypeVar("T")
CONF_DIR = str(Path(__file__).resolve().parents[3] / "conf")  # the config groups, beside src/ (an editable install)
CACHE_DIR = "~/.cache/gptexp"  # token files and the CPU's kept peak; $GPTEXP_CACHE moves it (conf/data/*.yaml)


def asset_path(name: str) -> str:
    """The path of a file bundled in gptexp/assets; configs write ${asset:stories260K/stories260K.bin}."""
    return str(resources.files("gptexp.assets") / name)


OmegaConf.register_new_resolver("asset", asset_path, replace=True)


class BadInput(Exception):
    """Input a command cannot use: a value, a file, a directory. Commands answer it in one line, exit status 2
    (gptexp.commands.cli); the message names the problem and the fix."""


class ConfigError(BadInput, ValueError):
    """A configuration value is wrong; the message names the key and how to fix it."""


def plain(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A resolved plain dict of a DictConfig (or a copy of a dict)."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def build_dataclass(cls: type[T], values: Mapping[str, Any], where: str) -> T:
    """Build dataclass `cls` from `values`, checking that every key exists and has the declared type.

    `where` is the config path of `values` (e.g. "model") and prefixes every key in messages.
    """
    values = plain(values)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [key for key in values if key not in names]
    if unknown:
        raise ConfigError(f"unknown key {', '.join(f'{where}.{k}' for k in unknown)}; "
                          f"valid keys of {where}: {', '.join(names)}")
    kwargs = {key: coerce(value, hints[key], f"{where}.{key}") for key, value in values.items()}
    try:
        return cls(**kwargs)
    except ValueError as error:
        raise ConfigError(f"{where}: {error}") from error


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a type hint (int, float, bool, str, X | None, tuple[X, ...]); ints widen to float."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return coerce(value, hint, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or (args[-1] is not Ellipsis and len(value) != len(args)):
            raise ConfigError(f"{key} must be a list of {len(args)} values, got {value!r}")
        item_hints = [args[0]] * len(value) if args[-1] is Ellipsis else args
        return tuple(coerce(v, h, f"{key}[{i}]") for i, (v, h) in enumerate(zip(value, item_hints)))
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is Any or (isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        return value
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{key} must be {'an' if name[0] in 'aeiou' else 'a'} {name}, got {value!r} ({type(value).__name__})")
