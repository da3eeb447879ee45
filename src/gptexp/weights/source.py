"""What every reader of weights returns (`Source`: a model, its tokenizer, what it was), and the one way an
architecture is built from a config and tensors (`assemble`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from gptexp.core.config import ConfigError
from gptexp.inference import nf4
from gptexp.inference import quantize as quantization
from gptexp.models import ARCHITECTURES, LanguageModel

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Source:
    model: LanguageModel
    tokenizer: Any  # None where it was not asked for (load_model)
    description: str  # what was loaded, for the log
    template: str | None = None  # the template an instruction run was trained in (gptexp.data.templates)
    system: str | None = None  # the system prompt it was trained with (data.system)

    def place(self, device: str = "auto", precision: str = "fp32", quantize: str | None = None,
              group_size: int = quantization.DEFAULT_GROUP_SIZE) -> str:
        """Move the model to `device` (auto | cpu | cuda) in `precision` (fp32 | bf16: the weights, or with
        `quantize` the activations and what stays unquantized), its linear layers quantized to `quantize` (int8 |
        int4, groups of `group_size`: gptexp.inference.quantize; nf4 but the head: gptexp.inference.nf4) where they
        are not already; returns the device's name. Bad values raise ConfigError naming the choices."""
        if precision not in PRECISIONS:
            raise ConfigError(f"precision={precision!r}: choose fp32 or bf16")
        if device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device={device!r}: choose auto, cpu or cuda")
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device=cuda, but torch sees no CUDA device here; use device=cpu (or auto)")
        quantization.check(quantize, group_size, quantization.LOADING_SCHEMES)
        held = getattr(self.model, "quantization", None)
        if held and quantize and quantize != held["scheme"]:
            raise ConfigError(f"quantize={quantize}: the source is already quantized to {held['scheme']}; leave "
                              f"quantize unset to use it as it is, or quantize the unquantized model")
        name = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
        self.model = self.model.to(device=name, dtype=PRECISIONS[precision]).eval()
        if quantize == "nf4" and not held:
            nf4.quantize(self.model, name, "quantize=nf4")
        elif quantize and not held:
            quantization.quantize(self.model, quantize, group_size)
        return name


def architecture(class_name: str, where: object) -> tuple[type[LanguageModel], type]:
    """The model class and config dataclass a file records by class name (GPT2, Llama)."""
    for model_cls, config_cls in ARCHITECTURES.values():
        if model_cls.__name__ == class_name:
            return model_cls, config_cls
    known = ", ".join(cls.__name__ for cls, _ in ARCHITECTURES.values())
    raise ConfigError(f"{where} records a model of class {class_name!r}, which gptexp does not have ({known}); pass "
                      f"a file gptexp wrote, or one in a format it reads")


def configured(config: Any, overrides: dict | None) -> Any:
    """`config` with the fields `overrides` names that it has (a GPT-2's dropout for training) replaced."""
    names = {f.name for f in fields(config)}
    return replace(config, **{k: v for k, v in (overrides or {}).items() if k in names})


BUFFER_FLOOR = 64 * 2**20  # bytes of derived tables (rotary) any file may imply, however small its weights


def _skeleton(config: Any, quantized: dict | None) -> LanguageModel:
    """The architecture `config` describes, on the meta device: shapes and names, no storage."""
    model_cls = next(cls for cls, config_cls in ARCHITECTURES.values() if isinstance(config, config_cls))
    with torch.device("meta"):
        model = model_cls(config)
        if quantized:
            quantization.replace_layers(model, quantized["scheme"],
                                        quantized["group_size"] or quantization.DEFAULT_GROUP_SIZE)
    return model


def check_claims(config: Any, shapes: Mapping[str, Sequence[int]], where: object,
                 names: Mapping[str, str] | None = None, quantized: dict | None = None) -> LanguageModel:
    """Hold what a file's metadata claims (`config`) against the tensors it holds (`shapes`, by gptexp's names),
    before anything is built: its depth against the blocks the tensors hold, each tensor's shape against the one the
    config implies, and the tables the config derives (LLaMA's rotary cos and sin, max_seq_len long) against the
    size of the weights. A file that claims 2^32 blocks or a context of 2^32 positions is refused in one line naming
    the field (`names`: each config field as the file calls it), not built. Returns the model on the meta device."""
    def claim(field: str) -> str:
        return f"{(names or {}).get(field, field)}={getattr(config, field)}"

    probe = _skeleton(replace(config, **{config.DEPTH: 1}), quantized)
    blocks = next(n for n, m in probe.named_modules() if isinstance(m, torch.nn.ModuleList))
    held = {int(key[len(blocks) + 1:].split(".")[0]) for key in shapes if key.startswith(blocks + ".")}
    depth = getattr(config, config.DEPTH)
    if len(held) != depth or max(held, default=-1) != depth - 1 or min(held, default=0) < 0:  # not 0..depth-1
        holds = f"{len(held)} block{'s' * (len(held) > 1)} ({min(held)}..{max(held)})" if held else "no blocks"
        raise ConfigError(f"{where}: {claim(config.DEPTH)} claims {depth} blocks, but its tensors hold {holds}; the "
                          f"file is damaged or its metadata was not written for these tensors")
    model = _skeleton(config, quantized)
    sizes = {f.name: v for f in fields(config) if type(v := getattr(config, f.name)) is int}
    state = model.state_dict()
    for key, tensor in state.items():
        found = tuple(shapes.get(key, tensor.shape))
        if found != tuple(tensor.shape):
            claims = [claim(f) for f, v in sizes.items() if v in tensor.shape and v not in found] or ["its config"]
            raise ConfigError(f"{where}: size mismatch for {key}: {', '.join(claims)} claims {tuple(tensor.shape)}, "
                              f"but the file holds {found}; the file is damaged or its metadata was not written for it")
    weights = sum(math.prod(shape) * 4 for shape in shapes.values())  # at float32, as they load
    for key, table in model.named_buffers():
        size = table.numel() * table.element_size()
        if key not in state and size > max(weights, BUFFER_FLOOR):  # a table derived from the config, not read
            claims = [claim(f) for f, v in sizes.items() if v == max(table.shape)] or ["its config"]
            raise ConfigError(f"{where}: {', '.join(claims)} asks for a {key} table of {size / 2**30:.1f} GiB, "
                              f"beyond what its {weights / 2**20:.0f} MiB of weights could need; the file's metadata "
                              f"is damaged, or was not written for these weights")
    return model


def assemble(config: Any, state: dict[str, torch.Tensor], where: object, *, quantized: dict | None = None,
             overrides: dict | None = None, names: Mapping[str, str] | None = None) -> LanguageModel:
    """The architecture `config` describes (GPT2Config, LlamaConfig), holding `state` (tensors by gptexp's names; a
    tied weight may be given once). Its claims are checked against the tensors first (check_claims, `names` naming
    the config's fields as the file calls them); it is built on the meta device and takes the tensors as they are:
    no copy, no initialisation. `quantized` ({"scheme", "group_size"}): the state holds gptexp's int8 / int4 layers.
    Raises ValueError naming `where` when the tensors do not fit the config."""
    config = configured(config, overrides)
    model = check_claims(config, {k: tuple(v.shape) for k, v in state.items()}, where, names, quantized)
    first_name: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):  # a tied weight: every name takes it
        first = first_name.setdefault(id(param), name)
        if name not in state and first in state:
            state = state | {name: state[first]}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(f"{where} does not hold the {type(model).__name__} its config describes: {error}") from None
    if quantized:  # each layer's kernel layout, from the values loaded
        for module in model.modules():
            if isinstance(module, quantization.QuantizedLinear):
                module.pack()
    else:  # a quantized model's embedding reads the quantized head: nothing to tie
        model.tie_weights()
    model.rebuild_buffers()
    return model.eval()
