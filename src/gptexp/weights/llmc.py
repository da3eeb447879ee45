"""karpathy/llm.c's GPT-2 files: the model checkpoint (gpt2_124M.bin) and the debug state
(gpt2_124M_debug_state.bin) that its test_gpt2 checks an implementation against.

Both start with 256 little-endian int32 (1024 bytes). The model's 16 tensors follow in the order
of LLMC_TENSORS, each stacked over the layers (all layers' ln1w, then all ln1b, ...), matrices as
(out, in) like nn.Linear, wte padded with zero rows to Vp. The state holds x, y (int32), the
logits (B, T, V) and loss of one forward pass, then every parameter gradient in the model's layout.
Named after llm.c's own writers: write_model, write_state; read_model reads versions 3 (float32) and 5 (bf16).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from gptexp.core.config import BadInput
from gptexp.core.writing import write_atomically
from gptexp.data.tokenizers import gpt2_tokenizer
from gptexp.models import GPT2, GPT2Config
from gptexp.weights.source import Source, assemble

MODEL_MAGIC, STATE_MAGIC = 20240326, 20240327
HEADER_INTS = 256
# llm.c's name -> gptexp's parameter name ({} = layer index; stacked over layers)
LLMC_TENSORS = {
    "wte": "transformer.wte.weight", "wpe": "transformer.wpe.weight",
    "ln1w": "transformer.h.{}.ln_1.weight", "ln1b": "transformer.h.{}.ln_1.bias",
    "qkvw": "transformer.h.{}.attn.c_attn.weight", "qkvb": "transformer.h.{}.attn.c_attn.bias",
    "attprojw": "transformer.h.{}.attn.c_proj.weight", "attprojb": "transformer.h.{}.attn.c_proj.bias",
    "ln2w": "transformer.h.{}.ln_2.weight", "ln2b": "transformer.h.{}.ln_2.bias",
    "fcw": "transformer.h.{}.mlp.c_fc.weight", "fcb": "transformer.h.{}.mlp.c_fc.bias",
    "fcprojw": "transformer.h.{}.mlp.c_proj.weight", "fcprojb": "transformer.h.{}.mlp.c_proj.bias",
    "lnfw": "transformer.ln_f.weight", "lnfb": "transformer.ln_f.bias",
}


class LlmcFormatError(BadInput, ValueError):
    """An llm.c file that is not what its header says; the message names the file and the tensor."""


def padded_vocab(vocab_size: int, multiple: int = 128) -> int:
    return -(-vocab_size // multiple) * multiple


def tensor_shapes(config: GPT2Config, padded: int) -> dict[str, tuple[int, ...]]:
    """Each llm.c tensor's shape in the file."""
    C, L = config.n_embd, config.n_layer
    return {"wte": (padded, C), "wpe": (config.block_size, C), "ln1w": (L, C), "ln1b": (L, C),
            "qkvw": (L, 3 * C, C), "qkvb": (L, 3 * C), "attprojw": (L, C, C), "attprojb": (L, C),
            "ln2w": (L, C), "ln2b": (L, C), "fcw": (L, 4 * C, C), "fcb": (L, 4 * C), "fcprojw": (L, C, 4 * C),
            "fcprojb": (L, C), "lnfw": (C,), "lnfb": (C,)}


def _header(*values: int) -> bytes:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:len(values)] = values
    return header.tobytes()


def llmc_tensors(tensors: dict[str, torch.Tensor], config: GPT2Config, padded: int) -> dict[str, torch.Tensor]:
    """gptexp-named tensors (parameters or their gradients) -> llm.c's 16, stacked and padded."""
    out = {}
    for name, ours in LLMC_TENSORS.items():
        if "{}" in ours:
            out[name] = torch.stack([tensors[ours.format(i)] for i in range(config.n_layer)])
        else:
            out[name] = tensors[ours]
    wte = torch.zeros(padded, config.n_embd, dtype=out["wte"].dtype)
    wte[:config.vocab_size] = out["wte"]
    out["wte"] = wte
    return out


def _check_gpt2(model: GPT2) -> None:
    if not isinstance(model, GPT2) or not model.config.bias:
        raise ValueError("llm.c's format holds a GPT-2 with biases (model.bias=true) and a tied head")


def write_model(model: GPT2, path: str | os.PathLike, padded: int | None = None) -> None:
    """Write llm.c's float32 checkpoint (version 3): header, then the 16 tensors (wte padded to `padded`
    rows, by default the vocabulary rounded up to a multiple of 128)."""
    _check_gpt2(model)
    c = model.config
    padded = padded or padded_vocab(c.vocab_size)
    params = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    tensors = llmc_tensors(params, c, padded)
    _write(path, _header(MODEL_MAGIC, 3, c.block_size, c.vocab_size, c.n_layer, c.n_head, c.n_embd, padded),
           [t.numpy().astype("<f4") for t in tensors.values()])


def write_state(model: GPT2, x: torch.Tensor, y: torch.Tensor, path: str | os.PathLike,
                padded: int | None = None) -> None:
    """Write llm.c's debug state (version 2) for the batch x, y (B, T): one forward and backward of
    `model` in float32, the logits (B, T, V), the loss and every gradient (dwte padded, and holding
    the tied head's gradient). The model's own gradients are left as they were."""
    _check_gpt2(model)
    c = model.config
    padded = padded or padded_vocab(c.vocab_size)
    if not (0 <= int(y.min()) and int(y.max()) < c.vocab_size):
        raise ValueError("llm.c takes no ignore index: every target must be a token id in [0, vocab_size)")
    params = dict(model.named_parameters())
    logits, loss = model(x, y)
    grads = torch.autograd.grad(loss, list(params.values()))
    named = {name: g.detach().float().cpu() for name, g in zip(params, grads)}
    named["lm_head.weight"] = named["transformer.wte.weight"]  # tied: one tensor, one gradient
    tensors = llmc_tensors(named, c, padded)
    B, T = x.shape
    _write(path, _header(STATE_MAGIC, 2, B, T),
           [x.cpu().numpy().astype("<i4"), y.cpu().numpy().astype("<i4"),
            logits.detach().float().cpu().numpy().astype("<f4"), np.array([loss.item()], dtype="<f4")]
           + [t.numpy().astype("<f4") for t in tensors.values()])


def _write(path, header: bytes, arrays: list[np.ndarray]) -> None:
    def write(f) -> None:
        f.write(header)
        for array in arrays:
            f.write(np.ascontiguousarray(array).tobytes())

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, write)  # a failed write leaves no half file


def _read_header(path: Path, magic: int, versions: tuple[int, ...], what: str) -> np.ndarray:
    with open(path, "rb") as f:
        raw = f.read(4 * HEADER_INTS)
    if len(raw) < 4 * HEADER_INTS:
        raise LlmcFormatError(f"{path}: {len(raw)} bytes is shorter than llm.c's 1024-byte header")
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != magic:
        raise LlmcFormatError(f"{path}: bad magic {header[0]}, expected {magic} for an llm.c {what}")
    if header[1] not in versions:
        raise LlmcFormatError(f"{path}: {what} version {header[1]} is not supported (versions {versions})")
    return header


def _split(path: Path, raw: bytes, offset: int, layout: dict[str, tuple[tuple[int, ...], str]],
           known_mistakes: dict[int, str]) -> dict[str, np.ndarray]:
    """Cut `raw` after `offset` into named arrays. A file of the wrong size is explained by a known
    mistake (its size difference in bytes -> message), else named with the tensor it cuts short."""
    sizes = {name: math.prod(shape) * np.dtype(dtype).itemsize for name, (shape, dtype) in layout.items()}
    expected = offset + sum(sizes.values())
    if len(raw) != expected and len(raw) - expected in known_mistakes:
        raise LlmcFormatError(f"{path}: {known_mistakes[len(raw) - expected]} (the file has {len(raw)} bytes, "
                              f"its header describes {expected})")
    out, position = {}, offset
    for name, (shape, dtype) in layout.items():
        if position + sizes[name] > len(raw):
            raise LlmcFormatError(f"{path}: truncated in tensor {name} (the file has {len(raw)} bytes, "
                                  f"{name} needs bytes {position}..{position + sizes[name]})")
        out[name] = np.frombuffer(raw, dtype=dtype, count=math.prod(shape), offset=position).reshape(shape)
        position += sizes[name]
    if position != len(raw):
        raise LlmcFormatError(f"{path}: {len(raw) - position} bytes after the last tensor: the header does not "
                              f"describe this file")
    return out


def padded_vocab_of(path: str | os.PathLike) -> int:
    """Vp, the padded vocabulary of an llm.c model file (its header's int 7)."""
    return int(_read_header(Path(path), MODEL_MAGIC, (3, 5), "model file")[7])


def read_model(path: str | os.PathLike, overrides: dict | None = None) -> GPT2:
    """Read an llm.c checkpoint (version 3: float32, version 5: bf16) into a float32 gptexp GPT2."""
    path = Path(path)
    header, raw = _read_header(path, MODEL_MAGIC, (3, 5), "model file"), path.read_bytes()
    max_t, vocab, n_layer, n_head, n_embd, padded = (int(v) for v in header[2:8])
    if min(max_t, vocab, n_layer, n_head, n_embd) <= 0 or padded < vocab:
        raise LlmcFormatError(f"{path}: header maxT={max_t} V={vocab} L={n_layer} NH={n_head} C={n_embd} Vp={padded} "
                              f"is not a GPT-2 (sizes must be positive and Vp >= V)")
    if any(header[8:]):
        raise LlmcFormatError(f"{path}: header ints 8..255 must be 0")
    try:
        config = GPT2Config(block_size=max_t, vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    except ValueError as error:
        raise LlmcFormatError(f"{path}: {error}") from error
    dtype = "<f4" if header[1] == 3 else "<u2"
    layout = {k: (s, dtype) for k, s in tensor_shapes(config, padded).items()}
    unpadded = {-(padded - vocab) * n_embd * np.dtype(dtype).itemsize:
                f"tensor wte has {vocab} rows, not the header's padded {padded}: pad the vocabulary with zero "
                f"rows (write_model does)"} if padded > vocab else {}
    arrays = _split(path, raw, 4 * HEADER_INTS, layout, unpadded)
    tensors = {k: _to_float(v) for k, v in arrays.items()}
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise LlmcFormatError(f"{path}: tensor {name} holds NaN or infinite values")
    if tensors["wte"][vocab:].any():
        raise LlmcFormatError(f"{path}: tensor wte: padded rows {vocab}..{padded - 1} must be zero")
    state = {}
    for name, ours in LLMC_TENSORS.items():
        if "{}" in ours:
            for i in range(n_layer):
                state[ours.format(i)] = tensors[name][i]
        else:
            state[ours] = tensors[name][:vocab] if name == "wte" else tensors[name]
    return assemble(config, state, path, overrides=overrides)


def read(path: Path, overrides: dict | None = None, with_tokenizer: bool = True) -> Source:
    """The GPT-2 of an llm.c model file, with GPT-2's BPE."""
    return Source(read_model(path, overrides), gpt2_tokenizer() if with_tokenizer else None, f"llm.c model {path}")


def _to_float(array: np.ndarray) -> torch.Tensor:
    if array.dtype == np.dtype("<u2"):  # bf16: the high half of a float32
        return torch.from_numpy(array.astype(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(array.copy())


def read_state(path: str | os.PathLike, config: GPT2Config, padded: int) -> dict[str, torch.Tensor]:
    """Read a debug state for a model of `config` (its file gives the config; the state does not):
    x, y, logits, loss, and grads (llm.c's 16 names, in the file's layout)."""
    path = Path(path)
    header, raw = _read_header(path, STATE_MAGIC, (2,), "debug state"), path.read_bytes()
    B, T = int(header[2]), int(header[3])
    if B <= 0 or not 0 < T <= config.block_size:
        raise LlmcFormatError(f"{path}: B={B}, T={T}: need B > 0 and 0 < T <= the model's maxT ({config.block_size})")
    layout = {"x": ((B, T), "<i4"), "y": ((B, T), "<i4"), "logits": ((B, T, config.vocab_size), "<f4"),
              "loss": ((1,), "<f4")}
    layout |= {f"d{k}": (s, "<f4") for k, s in tensor_shapes(config, padded).items()}
    V, C = config.vocab_size, config.n_embd
    mistakes = {-(padded - V) * C * 4: f"tensor dwte has {V} rows, not the padded {padded}: pad it with zero rows",
                B * T * (padded - V) * 4: f"tensor logits has {padded} columns: the state holds (B, T, V={V}), "
                                          f"unpadded"} if padded > V else {}
    arrays = {k: torch.from_numpy(v.copy()) for k, v in _split(path, raw, 4 * HEADER_INTS, layout, mistakes).items()}
    for name in ("x", "y"):
        if arrays[name].min() < 0 or arrays[name].max() >= config.vocab_size:
            raise LlmcFormatError(f"{path}: {name} holds token ids outside [0, {config.vocab_size})")
    arrays["x"], arrays["y"] = arrays["x"].long(), arrays["y"].long()
    return arrays


def tokenizer(path: Path):
    """GPT-2's BPE, which every llm.c model file is trained with."""
    return gpt2_tokenizer()
