"""A decoding step of a quantized model in one C call (kernels/step_cpu.cpp): one row, on a CPU.

At one row a step of GPT-2 124M in int8 spends ~4.2 ms reading its weights and ~3 ms in torch's ~180 small
operations and the Python around them (docs/benchmarks.md, "A fused decoding step"). The C step does the small
work in plain loops around the same product kernels, so the step costs little more than its products.

A model offers it through `fused_decode_step(cache)` by describing its blocks (`Block`) to `build`; GPT-2 and
LLaMA do. `build` returns None, and decoding keeps the model's own forward, unless every condition holds: the
compiled kernels are there, every linear layer is a QuantizedLinear the kernels read (int8; int4 of widths that are
multiples of 128, on a CPU with AVX512-BF16), the activations, norms and KV cache are float32 on the CPU, and the
cache holds one unpadded row.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from gptexp.inference import kernels
from gptexp.inference.kv_cache import KVCache
from gptexp.inference.quantize import QuantizedEmbedding, QuantizedLinear

ARCHITECTURES = ("gpt2", "llama")  # GPT-2: LayerNorm, learned positions, tanh GELU; LLaMA: RMSNorm, rotary, SwiGLU


@dataclass
class Block:
    """A transformer block's parts, in the order the step runs them."""

    norm1: nn.Module
    attn_in: Sequence[nn.Module]  # q|k|v fused (GPT-2's c_attn), or q, k, v
    attn_out: nn.Module
    norm2: nn.Module
    mlp_in: Sequence[nn.Module]  # GPT-2: c_fc; LLaMA: gate, up
    mlp_out: nn.Module


class _Linear(ctypes.Structure):
    _fields_ = [("in_features", ctypes.c_int64), ("out_features", ctypes.c_int64), ("group", ctypes.c_int64),
                ("weight", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [("norm1_weight", ctypes.c_void_p), ("norm1_bias", ctypes.c_void_p),
                ("norm2_weight", ctypes.c_void_p), ("norm2_bias", ctypes.c_void_p),
                ("attn_in", _Linear * 3), ("attn_out", _Linear), ("mlp_in", _Linear * 2), ("mlp_out", _Linear)]


class _Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("llama", "n_layer", "dim", "n_head", "n_kv_head", "head_dim",
                                                    "hidden", "attn_inputs", "mlp_inputs", "max_len")] + [
                ("eps", ctypes.c_double), ("embedding", ctypes.c_void_p), ("head_scales", ctypes.c_void_p),
                ("head_zeros", ctypes.c_void_p), ("positions", ctypes.c_void_p),
                ("rope_cos", ctypes.c_void_p), ("rope_sin", ctypes.c_void_p), ("layers", ctypes.POINTER(_Layer)),
                ("norm_weight", ctypes.c_void_p), ("norm_bias", ctypes.c_void_p), ("head", _Linear),
                ("keys", ctypes.c_void_p), ("values", ctypes.c_void_p)]


class FusedStep:
    """`step(idx (1, 1), cache)` does what `model(idx, cache=cache)[0]` does, in one C call: returns the logits
    (1, 1, vocab) and advances the cache. The logits are one buffer, overwritten by the next step."""

    def __init__(self, function, description: _Model, tensors: list[torch.Tensor], vocab: int, cache: KVCache):
        self._function, self._description, self._tensors = function, description, tensors  # tensors: kept alive
        self._cache = cache
        self._logits = torch.empty(1, 1, vocab)

    def __call__(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if cache is not self._cache or idx.shape != (1, 1):
            raise ValueError(f"a fused step continues its own cache by one token, got {tuple(idx.shape)} tokens")
        status = self._function(ctypes.byref(self._description), int(idx), cache.length, self._logits.data_ptr())
        if status == 1:
            raise MemoryError("no memory for a decoding step's activations")
        if status == 4:
            raise IndexError(f"token {int(idx)} is outside the vocabulary of {self._logits.size(-1)} tokens")
        if status:
            raise RuntimeError(f"gptexp_decode_step failed with status {status} at position {cache.length} of "
                               f"{cache.max_len}")
        cache.length += 1
        return self._logits


def build(cache: KVCache, architecture: str, blocks: Sequence[Block], *, embedding: nn.Module, norm: nn.Module,
          head: nn.Module, n_head: int, n_kv_head: int, eps: float, positions: torch.Tensor | None = None,
          rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> FusedStep | None:
    """The fused step of the model these parts make up, continuing `cache`; None where one of the module
    docstring's conditions fails. GPT-2 passes its `positions` table, LLaMA its `rotary` (cos, sin) tables."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    linears = [head, *(m for b in blocks for m in (*b.attn_in, b.attn_out, *b.mlp_in, b.mlp_out))]
    if not all(_readable(m) for m in linears):  # before the library: an unquantized model never builds it
        return None
    function = kernels.decode_step()
    tables = (positions, *(rotary or ()), getattr(embedding, "weight", None), getattr(head, "scales", None),
              getattr(head, "zeros", None))
    floats = [cache.keys, cache.values, norm.weight, *(m.weight for b in blocks for m in (b.norm1, b.norm2)),
              *(t for t in tables if t is not None)]
    if (function is None or cache.keys.size(1) != 1 or cache.pad is not None
            or not all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in floats)
            or not (isinstance(embedding, QuantizedEmbedding) and embedding.head[0] is head
                    or type(embedding) is nn.Embedding)):
        return None
    tensors = []

    def address(tensor: torch.Tensor | None) -> int | None:
        if tensor is None:
            return None
        tensors.append(tensor)
        return tensor.data_ptr()

    def linear(layer: QuantizedLinear) -> _Linear:
        int4 = layer.scheme == "int4"
        return _Linear(layer.in_features, layer.out_features, layer.group_size if int4 else 0, address(layer.qweight),
                       address(layer.scale_zero_pairs if int4 else layer.scales32), address(layer.bias))

    def bias(module: nn.Module) -> int | None:
        return address(getattr(module, "bias", None))

    layers = (_Layer * len(blocks))(*(
        _Layer(address(b.norm1.weight), bias(b.norm1), address(b.norm2.weight), bias(b.norm2),
               (_Linear * 3)(*map(linear, b.attn_in)), linear(b.attn_out), (_Linear * 2)(*map(linear, b.mlp_in)),
               linear(b.mlp_out))
        for b in blocks))
    first, tied = blocks[0], isinstance(embedding, QuantizedEmbedding)
    dim, head_dim = first.attn_out.out_features, cache.keys.size(-1)
    cos, sin = rotary or (None, None)
    description = _Model(
        llama=architecture == "llama", n_layer=len(blocks), dim=dim, n_head=n_head, n_kv_head=n_kv_head,
        head_dim=head_dim, hidden=first.mlp_out.in_features, attn_inputs=len(first.attn_in),
        mlp_inputs=len(first.mlp_in), max_len=cache.max_len, eps=eps,
        embedding=None if tied else address(embedding.weight), head_scales=address(head.scales if tied else None),
        head_zeros=address(getattr(head, "zeros", None) if tied else None),
        positions=address(positions), rope_cos=address(cos), rope_sin=address(sin), layers=layers,
        norm_weight=address(norm.weight), norm_bias=bias(norm), head=linear(head), keys=address(cache.keys),
        values=address(cache.values))
    return FusedStep(function, description, tensors + [layers], head.out_features, cache)


def _readable(layer: nn.Module) -> bool:
    """Whether the C step reads this layer's weights: a QuantizedLinear on the CPU with a float32 bias if any, int8
    or int4 of a width the one-row int4 kernel takes."""
    return (type(layer) is QuantizedLinear and layer.kernel is not None and layer.qweight.is_contiguous()
            and (layer.bias is None or layer.bias.dtype == torch.float32))
