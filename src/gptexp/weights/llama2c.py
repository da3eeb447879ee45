"""llama2.c's legacy export (`export.py --version 0`): a header of 7 int32, dim, hidden_dim, n_layers, n_heads,
n_kv_heads, vocab_size (negative: a separate classifier follows) and seq_len, then float32 tensors in the order
`read` lists, q and k rows in Meta's rotary layout."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import torch

from gptexp.models import LlamaConfig
from gptexp.weights import meta
from gptexp.weights.llmc import MODEL_MAGIC
from gptexp.weights.meta import interleaved_to_half
from gptexp.weights.source import Source, assemble

LLAMA2C_MAGIC = 0x616B3432  # "ak42": llama2.c's versioned exports, which this reader does not take
NOT_LLMC = f"and not an llm.c model file either (magic {MODEL_MAGIC})"  # the other .bin gptexp reads


def read(path: Path, overrides: dict | None = None, with_tokenizer: bool = True) -> Source:
    """The LLaMA of a llama2.c legacy export, with the one *.model file beside it as its tokenizer."""
    raw = path.read_bytes()
    if len(raw) < 28:
        raise ValueError(f"{path} is too short to be a llama2.c checkpoint ({len(raw)} bytes), {NOT_LLMC}")
    if struct.unpack("<I", raw[:4])[0] == LLAMA2C_MAGIC:
        raise ValueError(f"{path} is a versioned llama2.c export (magic 'ak42'); only the legacy format is read: "
                         f"export with llama2.c's `export.py --version 0`")
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = struct.unpack("<7i", raw[:28])
    if min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, seq_len) <= 0 or vocab_size == 0:
        raise ValueError(f"{path}: header {dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len} "
                         f"is not a llama2.c legacy header, {NOT_LLMC}")
    shared, vocab_size = vocab_size > 0, abs(vocab_size)
    config = LlamaConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab_size,
                         hidden_dim=hidden_dim, max_seq_len=seq_len, tie_embeddings=shared)
    head_dim = dim // n_heads
    kv_dim, half_head = n_kv_heads * head_dim, head_dim // 2
    layout = [("model.embed_tokens.weight", (vocab_size, dim)), ("input_layernorm", (n_layers, dim)),
              ("q_proj", (n_layers, dim, dim)), ("k_proj", (n_layers, kv_dim, dim)), ("v_proj", (n_layers, kv_dim, dim)),
              ("o_proj", (n_layers, dim, dim)), ("post_attention_layernorm", (n_layers, dim)),
              ("gate_proj", (n_layers, hidden_dim, dim)), ("down_proj", (n_layers, dim, hidden_dim)),
              ("up_proj", (n_layers, hidden_dim, dim)), ("model.norm.weight", (dim,)),
              ("freq_cis_real", (seq_len, half_head)), ("freq_cis_imag", (seq_len, half_head))]
    if not shared:
        layout.append(("lm_head.weight", (vocab_size, dim)))
    expected = 28 + 4 * sum(math.prod(shape) for _, shape in layout)
    if len(raw) != expected:
        raise ValueError(f"{path}: the header describes {expected} bytes but the file has {len(raw)} "
                         f"(truncated, or not a llama2.c legacy export)")
    values, offset, state = np.frombuffer(raw, dtype="<f4", offset=28), 0, {}
    for name, shape in layout:
        size = math.prod(shape)
        tensor = torch.from_numpy(values[offset:offset + size].reshape(shape).copy())
        offset += size
        if name.startswith("freq_cis"):
            continue  # rotary tables are recomputed
        if "." in name:
            state[name] = tensor
            continue
        module = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else (
            "mlp" if name.endswith(("gate_proj", "down_proj", "up_proj")) else None)
        for i in range(n_layers):
            weight = tensor[i]
            if name == "q_proj":
                weight = interleaved_to_half(weight, n_heads)
            elif name == "k_proj":
                weight = interleaved_to_half(weight, n_kv_heads)
            state[f"model.layers.{i}.{module + '.' if module else ''}{name}.weight"] = weight
    return Source(assemble(config, state, path, overrides=overrides), meta.tokenizer(path) if with_tokenizer else None,
                  f"llama2.c {path}")


def tokenizer(path: Path):
    """The tokenizer of a llama2.c export: the one SentencePiece *.model file beside it."""
    return meta.tokenizer(path)
