"""Meta's LLaMA checkpoints: a directory with params.json and consolidated.NN.pth, one file per model-parallel
rank (13B: 2, 70B: 8), merged along the dimension each layer was split on (META_NAMES), renamed to HF's names.

Meta (and llama2.c) store each head's wq/wk rows with the two halves of a rotary pair side by side (0, 1), (2, 3),
...; HF and gptexp place them D/2 apart (0, D/2), (1, D/2 + 1), ...: `interleaved_to_half`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from gptexp.core.safe_load import torch_load
from gptexp.data.tokenizers import SentencePieceTokenizer
from gptexp.models import LlamaConfig
from gptexp.weights.source import Source, assemble

# Meta name (per layer without "layers.N.") -> HF name, and the dimension Meta's shards split it on
META_NAMES = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", 1),
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q or k projection from Meta's rotary layout to HF's, head by head."""
    rows, cols = _heads(w, n_heads)
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of interleaved_to_half: HF's rotary layout back to Meta's (llama.cpp's too)."""
    rows, cols = _heads(w, n_heads)
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _heads(w: torch.Tensor, n_heads: int) -> tuple[int, int]:
    if w.dim() != 2 or n_heads <= 0 or w.shape[0] % (2 * n_heads):
        raise ValueError(f"a q or k projection of shape {tuple(w.shape)} is not {n_heads} heads of pairs of rows: "
                         f"the head count the file records does not fit its tensors")
    return w.shape


def read(directory: Path, overrides: dict | None = None, with_tokenizer: bool = True) -> Source:
    """The LLaMA of a Meta directory, with the tokenizer.model beside it."""
    params = json.loads((directory / "params.json").read_text())
    if not isinstance(params, dict) or not all(isinstance(params.get(k), int) for k in ("dim", "n_layers", "n_heads")):
        raise ValueError(f"{directory}/params.json does not hold Meta's params (integers dim, n_layers, n_heads, ...)")
    shards = sorted(directory.glob("consolidated.*.pth"))
    if not shards:
        raise FileNotFoundError(f"{directory} has params.json but no consolidated.*.pth weight files")
    parts = [torch_load(s, mmap=True) for s in shards]
    state = {}
    for key in parts[0]:
        if key == "rope.freqs":
            continue
        layer = re.match(r"layers\.(\d+)\.(.+)", key)
        if (layer.group(2) if layer else key) not in META_NAMES:
            raise ValueError(f"{shards[0]} holds {key}, which is not a tensor of Meta's LLaMA")
        name, dim = META_NAMES[layer.group(2) if layer else key]
        tensors = [p[key] for p in parts]
        state[f"model.layers.{layer.group(1)}.{name}" if layer else name] = (
            tensors[0] if dim is None or len(tensors) == 1 else torch.cat(tensors, dim=dim))
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv_heads = params.get("n_kv_heads") or n_heads
    for key in state:
        if key.endswith("q_proj.weight"):
            state[key] = interleaved_to_half(state[key], n_heads)
        elif key.endswith("k_proj.weight"):
            state[key] = interleaved_to_half(state[key], n_kv_heads)
    vocab_size, hidden_dim = (state[key].shape[0] if key in state else None
                              for key in ("model.embed_tokens.weight", "model.layers.0.mlp.gate_proj.weight"))
    if vocab_size is None:
        raise ValueError(f"{shards[0]} holds no tok_embeddings.weight: not a Meta LLaMA checkpoint")
    config = LlamaConfig(dim=dim, n_layers=params["n_layers"], n_heads=n_heads, n_kv_heads=n_kv_heads,
                         vocab_size=vocab_size, hidden_dim=hidden_dim, norm_eps=params.get("norm_eps", 1e-5),
                         rope_theta=params.get("rope_theta", 10000.0), max_seq_len=params.get("max_seq_len", 4096),
                         tie_embeddings=False)
    names = {field: f"params.json's {field}" for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len")}
    return Source(assemble(config, state, directory, overrides=overrides, names=names),
                  tokenizer(directory) if with_tokenizer else None,
                  f"Meta LLaMA {directory}")


def tokenizer(path: Path) -> SentencePieceTokenizer:
    """The SentencePiece model that belongs to a LLaMA checkpoint (sentencepiece_beside)."""
    return SentencePieceTokenizer(sentencepiece_beside(path))


def sentencepiece_beside(path: Path) -> Path:
    """The tokenizer file of a LLaMA checkpoint: tokenizer.model in its directory or the directory's parent (Meta's
    download layout), or the one *.model file beside a checkpoint file (llama2.c's .bin)."""
    if path.is_file():
        beside = sorted(path.parent.glob("*.model"))
        if len(beside) == 1:
            return beside[0]
        raise FileNotFoundError(f"{len(beside)} SentencePiece *.model files beside {path}, expected one; "
                                f"set model.tokenizer=<path to the .model file>")
    for candidate in (path / "tokenizer.model", path.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no tokenizer.model in {path} or its parent; set model.tokenizer=<path to the .model file>")
