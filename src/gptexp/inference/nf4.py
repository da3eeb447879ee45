"""NF4, QLoRA's 4-bit NormalFloat (Dettmers et al., 2023), through bitsandbytes: on CUDA, or on a CPU through
bitsandbytes' CPU backend (0.48 and later, Linux x86-64).

Every linear layer but the output head becomes a `bnb.nn.Linear4bit`: blocks of 64 weights share an absmax
(itself quantized to 8 bits, "double quantization"), and products run in bf16. The layers quantize their
weights when moved to their device. The same layers serve QLoRA's frozen base (finetune.quantize=4bit) and a
base loaded for `sample` or `evaluate` (quantize=nf4).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

import torch
import torch.nn as nn

from gptexp.core.config import ConfigError

log = logging.getLogger(__name__)

QUANT_STATE = ".weight.quant_state.bitsandbytes__nf4"  # the key that marks a layer bitsandbytes wrote in NF4


@contextmanager
def quiet_import():
    """Around the first import of bitsandbytes (peft imports it too, where it is installed): its CPU backend asks
    the `kernels` package (a transformers dependency) for a faster kernel from the Hugging Face hub, and logs the
    refusal as a warning on every run; bitsandbytes then keeps its own kernel."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def require_bitsandbytes(option: str):
    """bitsandbytes, or a ConfigError with the install line naming `option`."""
    try:
        with quiet_import():
            import bitsandbytes
    except ImportError as error:
        raise ConfigError(f"{option} needs bitsandbytes: pip install bitsandbytes (or pip install -e \".[qlora]\")") \
            from error
    return bitsandbytes


def quantize(model: nn.Module, device: str, option: str, training: bool = False) -> nn.Module:
    """Replace every nn.Linear of `model` but its output head (in place) by an NF4 `Linear4bit` quantized on
    `device`; returns the model. Raises ConfigError, naming `option`, without bitsandbytes.

    On a CPU, bitsandbytes repacks a layer in place for its faster inference kernel the first time it runs in
    eval mode without gradients, where the layer's shape allows (out_features a multiple of 32, in_features of
    64). With `training` no layer is repacked: a QLoRA run validates between its steps, and trains and saves in
    the one layout it quantized to."""
    bnb = require_bitsandbytes(option)
    start = time.perf_counter()
    head = getattr(model, "lm_head", None)
    names = [name for name, m in model.named_modules() if type(m) is nn.Linear and m is not head]
    for name in names:  # by name: a list of the layers would hold every float weight to the end
        linear = model.get_submodule(name)
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4", module=layer)
        if linear.bias is not None:
            layer.bias = linear.bias
        layer.support_avx512bf16_for_cpu &= not training and linear.out_features % 32 == linear.in_features % 64 == 0
        parent, _, child = name.rpartition(".")
        # quantized as it replaces the layer (Params4bit quantizes on its move to a device): one float weight at
        # a time is freed, rather than every one held until the end
        setattr(model.get_submodule(parent) if parent else model, child, layer.to(device))
    model.to(device)
    log.info("quantized %d linear layers to nf4 (bitsandbytes, on %s) in %.1f s", len(names), device,
             time.perf_counter() - start)
    return model


def is_quantized_state(state: dict) -> bool:
    """Whether a state dict holds layers bitsandbytes wrote in NF4 (a QLoRA run's checkpoint)."""
    return any(key.endswith(QUANT_STATE) for key in state)


def load_state(model: nn.Module, state: dict, prefix: str = "") -> None:
    """Give each NF4 layer of `model` the quantized values and quantization state that `state` (keys under
    `prefix`) holds for it, taking the latter out of `state` so that the rest loads as usual: a resumed QLoRA
    run goes on from the base it saved."""
    bnb = require_bitsandbytes("a QLoRA checkpoint")
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            key = f"{prefix}{name}.weight"
            stats = {k: state.pop(k) for k in [k for k in state if k.startswith(key + ".")]}
            module.weight = bnb.nn.Params4bit.from_prequantized(state[key], stats, device=module.weight.device,
                                                                module=module)
            module.quant_state = module.weight.quant_state


def dequantized(state: dict, option: str) -> dict:
    """`state` with every NF4 weight bitsandbytes wrote replaced by its float values (in the dtype it was
    quantized from), and their quantization state dropped. Raises ConfigError, naming `option`, without
    bitsandbytes."""
    bnb = require_bitsandbytes(option)
    state = dict(state)
    for key in [k.removesuffix(QUANT_STATE) + ".weight" for k in state if k.endswith(QUANT_STATE)]:
        stats = {k: state.pop(k) for k in [k for k in state if k.startswith(key + ".")]}
        quant_state = bnb.functional.QuantState.from_dict(stats, device=torch.device("cpu"))
        state[key] = bnb.functional.dequantize_4bit(state[key], quant_state)
    return state
