"""Weight-only quantization for decoding: fewer bytes a weight, so fewer bytes read a token.

int8 keeps one scale per output channel (w = q · s, q in [-127, 127]); int4 keeps a scale and a zero point per
group of `group_size` input weights of an output channel (w = (q - 8) · s + z, q in [0, 15]). Activations,
norms, biases and the KV cache stay in the model's dtype. Products read the packed weights themselves, and no
call ever rebuilds a float weight: on a CPU through gptexp's own operators (gptexp.inference.kernels:
torch.ops.gptexp.int8_mm at 2x ATen's at one row; int4_mv at one row with AVX512-BF16), else ATen's weight-only kernels
(`_weight_int8pack_mm`; `_weight_int4pack_mm_for_cpu` on a CPU,
`_weight_int4pack_mm` on CUDA). The state dict holds the quantized values in a plain layout (int8 rows; int4 as
two values a byte, the even column in the high nibble), the same on every device; each int4 layer repacks them
into its device's kernel layout when it is built or moved.

A tied input embedding (GPT-2's, llama2.c's small models') reads its rows from the quantized head, so the
token a model reads and the token it writes keep one weight.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptexp.core.config import ConfigError
from gptexp.inference import kernels

log = logging.getLogger(__name__)

SCHEMES = ("int8", "int4")
# what `sample` and `evaluate` can load a model in: gptexp's schemes, or bitsandbytes' NF4 (gptexp.inference.nf4)
LOADING_SCHEMES = (*SCHEMES, "nf4")
GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = 128  # int4: chosen by the perplexity it costs (docs/benchmarks.md, "Quantized decoding")
INT4_ROWS = 16  # the int4 kernels take output channels in blocks (CPU: of 16, CUDA: of 8)


def check(scheme: str | None, group_size: int = DEFAULT_GROUP_SIZE, schemes: tuple[str, ...] = SCHEMES) -> None:
    """Raise ConfigError for a scheme outside `schemes`, or a group size gptexp cannot quantize with."""
    if scheme is not None and scheme not in schemes:
        raise ConfigError(f"quantize={scheme!r}: choose {', '.join(schemes[:-1])} or {schemes[-1]} (weight-only), "
                          f"or null for none")
    if scheme == "int4" and group_size not in GROUP_SIZES:
        raise ConfigError(f"quantize_group_size={group_size!r}: the int4 kernels take groups of "
                          f"{', '.join(map(str, GROUP_SIZES))}")


def quantize(model: nn.Module, scheme: str, group_size: int = DEFAULT_GROUP_SIZE) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by a QuantizedLinear of `scheme`, and a tied input embedding
    by one that reads the quantized head; returns the model. Logs how long it took and the bytes before and
    after. Raises ConfigError for an unknown scheme, or naming a layer whose width the group size does not
    divide."""
    check(scheme, group_size)
    linears = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    if scheme == "int4":
        for name, m in linears:
            if m.in_features % group_size:
                raise ConfigError(f"quantize=int4: layer {name} has {m.in_features} inputs, which groups of "
                                  f"{group_size} do not divide; choose a quantize_group_size that divides it")
    start, before = time.perf_counter(), weight_bytes(model)
    replace_layers(model, scheme, group_size)
    log.info("quantized %d linear layers to %s%s in %.1f s: weights %.0f MB -> %.0f MB", len(linears), scheme,
             f" (groups of {group_size})" if scheme == "int4" else "", time.perf_counter() - start, before / 1e6,
             weight_bytes(model) / 1e6)
    return model


def replace_layers(model: nn.Module, scheme: str, group_size: int) -> None:
    """quantize's work, unchecked and silent: on a model built on the meta device, the skeleton that a saved
    quantized state dict loads into (then `pack` each layer)."""
    quantized = {}
    for name, linear in [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]:
        quantized[id(linear.weight)] = layer = QuantizedLinear.from_linear(linear, scheme, group_size)
        _replace(model, name, layer)
    for name, m in list(model.named_modules()):
        if type(m) is nn.Embedding and id(m.weight) in quantized:
            _replace(model, name, QuantizedEmbedding(quantized[id(m.weight)]))
    model.quantization = {"scheme": scheme, "group_size": group_size if scheme == "int4" else None}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored (parameters and persistent buffers; a shared tensor once)."""
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    return sum(t.nbytes for t in tensors.values())


def read_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decoding step reads: every linear layer's as its kernel reads them, and the other
    parameters (norms); of an embedding only a row is read, which is not counted."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, (nn.Embedding, QuantizedEmbedding)):
            continue
        tensors = module.kernel_tensors() if isinstance(module, QuantizedLinear) else module.parameters(recurse=False)
        for tensor in tensors:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.nbytes
    return total


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class QuantizedLinear(nn.Module):
    """A linear layer with int8 or int4 weights (module docstring); `forward` as nn.Linear's."""

    def __init__(self, in_features: int, out_features: int, scheme: str, group_size: int = DEFAULT_GROUP_SIZE,
                 bias: bool = True, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.group_size = group_size if scheme == "int4" else in_features
        groups = in_features // self.group_size
        if scheme == "int8":
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype, device=device))
            self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.kernel = None  # the gptexp operator this layer's products use where it is (pack)
        self.pack()

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, group_size: int = DEFAULT_GROUP_SIZE) -> QuantizedLinear:
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, scheme, group_size, linear.bias is not None,
                    weight.dtype, weight.device)
        w = weight.float()
        if scheme == "int8":
            scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
            layer.qweight.copy_((w / scales[:, None]).round().clamp(-127, 127))
            layer.scales.copy_(scales)
        else:
            groups = w.view(w.size(0), -1, group_size)
            low, high = groups.amin(dim=-1), groups.amax(dim=-1)
            scales = (high - low).clamp(min=1e-12) / 15
            q = ((groups - low[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.uint8).flatten(1)
            layer.qweight.copy_(q[:, 0::2] << 4 | q[:, 1::2])
            layer.scales.copy_(scales)
            layer.zeros.copy_(low + 8 * scales)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        layer.pack()
        return layer

    def int4_values(self, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """int4: the quantized values (N, K) of `rows`, as int32 in [0, 15]."""
        packed = self.qweight[rows]
        return torch.stack([packed >> 4, packed & 15], dim=-1).flatten(-2).to(torch.int32)

    def dequantized(self, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """The float weights (rows, K) these values stand for, in the scales' dtype."""
        if self.scheme == "int8":
            return self.qweight[rows].to(self.scales.dtype) * self.scales[rows][..., None]
        q = self.int4_values(rows).unflatten(-1, (-1, self.group_size)).to(self.scales.dtype)
        return ((q - 8) * self.scales[rows][..., None] + self.zeros[rows][..., None]).flatten(-2)

    def pack(self) -> None:
        """int4: the values in the kernel layout of the device they are on (buffers kept out of the state dict)."""
        if self.qweight.is_meta:  # a skeleton: nothing to pack yet
            return
        on_cpu = self.qweight.device.type == "cpu"
        if self.scheme == "int8":  # the values as they are; gptexp's CPU kernel reads float32 scales
            self.register_buffer("scales32", self.scales.float().contiguous(), persistent=False)
            self.kernel = "int8_mm" if on_cpu and kernels.available("int8_mm") else None
            return
        # gptexp's one-row int4 product takes widths that are multiples of 128 (more rows go to ATen's, faster there:
        # 13.6 against 19.8 ms over GPT-2 124M at 8 rows)
        self.kernel = "int4_mv" if on_cpu and self.in_features % 128 == 0 and kernels.available("int4_mv") else None
        # every kernel multiplies bf16 scales and zero points (ATen's float32 int4 CPU kernel takes ~30x as long:
        # docs/benchmarks.md); gptexp's reads them in pairs (N, groups, 2), ATen's as (groups, N, 2)
        pairs = torch.stack([self.scales, self.zeros], dim=-1).bfloat16().contiguous()
        self.register_buffer("scale_zero_pairs", pairs, persistent=False)
        rows = -self.out_features % INT4_ROWS  # padding channels, cut from the output
        scales_and_zeros = F.pad(pairs.transpose(0, 1), (0, 0, 0, rows)).contiguous()
        if self.qweight.device.type == "cuda":
            inner_k_tiles = next(t for t in (8, 4, 2) if self.in_features % (t * 16) == 0)
            packed = torch.ops.aten._convert_weight_to_int4pack(F.pad(self.qweight, (0, 0, 0, rows)), inner_k_tiles)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(F.pad(self.int4_values(), (0, 0, 0, rows)), 1)
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_and_zeros", scales_and_zeros, persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.pack()  # the kernel layout follows the values to their device and dtype
        return self

    def kernel_tensors(self) -> list[torch.Tensor]:
        """What a decoding step's product reads: the quantized weight and its scales (and zero points), and the bias."""
        if self.scheme == "int8":
            tensors = [self.qweight, self.scales32]
        elif self.kernel == "int4_mv":
            tensors = [self.qweight, self.scale_zero_pairs]
        else:
            tensors = [self.packed, self.scales_and_zeros]
        return tensors + ([] if self.bias is None else [self.bias])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.kernel == "int8_mm" and rows.dtype in (torch.float32, torch.bfloat16):
            y = torch.ops.gptexp.int8_mm(rows, self.qweight, self.scales32)
        elif self.scheme == "int8" and rows.dtype == torch.bfloat16 and self.in_features % 64:
            # ATen's bf16 CPU kernel reads past a row whose width is no multiple of 64 (a segfault in torch 2.13)
            y = torch.ops.aten._weight_int8pack_mm(rows.float(), self.qweight, self.scales32).to(rows.dtype)
        elif self.scheme == "int8":
            y = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scales.to(rows.dtype))
        elif rows.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(rows.bfloat16(), self.packed, self.group_size,
                                                   self.scales_and_zeros)[:, :self.out_features].to(rows.dtype)
        elif rows.size(0) == 1 and self.kernel == "int4_mv":  # a decoding step: one row
            y = torch.ops.gptexp.int4_mv(rows[0].float(), self.qweight, self.scale_zero_pairs, self.group_size)
            y = y[None].to(rows.dtype)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows.bfloat16(), self.packed, self.group_size,
                                                           self.scales_and_zeros)[:, :self.out_features].to(rows.dtype)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme}{group}"


class QuantizedEmbedding(nn.Module):
    """The input embedding of a model whose head shares it: each looked-up row dequantized from the head's values."""

    def __init__(self, head: QuantizedLinear):
        super().__init__()
        self.head = [head]  # not a submodule: the head's buffers belong to the head alone (one copy in the state dict)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head[0].dequantized(idx)
