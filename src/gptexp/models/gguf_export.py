"""GGUF, the file llama.cpp, Ollama and LM Studio run: a GPT-2 or LLaMA written whole, so a GGUF reader needs
nothing else. The file carries llama.cpp's architecture metadata (`gpt2`, `llama`), the whole tokenizer (GPT-2's
byte-level BPE vocabulary and merges; SentencePiece's pieces, scores and types) and every weight under llama.cpp's
tensor names, in f32, f16, q8_0 or q4_0 (blocks of 32 weights sharing an f16 scale).

As llama.cpp's own converter does: 1-D tensors (norms, biases) stay f32; the q and k projections of a LLaMA are
permuted from HF's half-split rotary layout to the interleaved one llama.cpp rotates; GPT-2's tied head is written
as `output.weight` too. A weight whose rows a quantization's block does not divide is written in f16.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from gptexp.config import ConfigError
from gptexp.data.tokenizers import BPETokenizer, SentencePieceTokenizer
from gptexp.models.gpt2 import GPT2
from gptexp.models.llama import Llama
from gptexp.models.quantize import QuantizedEmbedding, QuantizedLinear

DTYPES = ("f32", "f16", "q8_0", "q4_0")
BLOCK = 32  # weights a q8_0 or q4_0 block holds


def write_gguf(model: nn.Module, tokenizer, path: str | Path, dtype: str = "f16") -> None:
    """Write `model` (GPT2 or Llama, float or quantized by gptexp) and its tokenizer to `path` as GGUF with 2-D
    weights in `dtype`. Raises ConfigError for a dtype, model or tokenizer GGUF cannot carry."""
    import gguf

    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}: choose {', '.join(DTYPES)}")
    if isinstance(model, GPT2):
        architecture, tensors = "gpt2", _gpt2_tensors(model)
    elif isinstance(model, Llama):
        architecture, tensors = "llama", _llama_tensors(model)
    else:
        raise ConfigError(f"format=gguf writes GPT-2 and LLaMA models, not a {type(model).__name__}")
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(Path(path).stem)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[dtype])
    _architecture(writer, model)
    _tokenizer(writer, tokenizer, model)
    floats = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}
    for name, tensor in tensors:
        array = tensor.detach().float().cpu().numpy()
        kind = _tensor_type(array, dtype)
        data = array.astype(floats[kind]) if kind in floats else gguf.quants.quantize(array, kind)  # blocks as bytes
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tensor_type(array: np.ndarray, dtype: str):
    import gguf

    types = gguf.GGMLQuantizationType
    if array.ndim == 1 or dtype == "f32":
        return types.F32
    if dtype == "f16" or array.shape[-1] % BLOCK:
        return types.F16
    return types.Q8_0 if dtype == "q8_0" else types.Q4_0


def _weight(module: nn.Module) -> torch.Tensor:
    """A linear layer's or an embedding's float weight (out, in); a gptexp-quantized one's dequantized."""
    if isinstance(module, QuantizedLinear):
        return module.dequantized().float()
    if isinstance(module, QuantizedEmbedding):
        return module.head[0].dequantized().float()
    return module.weight


def _gpt2_tensors(model: GPT2):
    t = model.transformer
    yield "token_embd.weight", _weight(t.wte)
    yield "position_embd.weight", t.wpe.weight
    for i, block in enumerate(t.h):
        parts = {"attn_norm": block.ln_1, "attn_qkv": block.attn.c_attn, "attn_output": block.attn.c_proj,
                 "ffn_norm": block.ln_2, "ffn_up": block.mlp.c_fc, "ffn_down": block.mlp.c_proj}
        for name, module in parts.items():
            yield f"blk.{i}.{name}.weight", _weight(module)
            if module.bias is not None:
                yield f"blk.{i}.{name}.bias", module.bias
    yield "output_norm.weight", t.ln_f.weight
    if t.ln_f.bias is not None:
        yield "output_norm.bias", t.ln_f.bias
    yield "output.weight", _weight(model.lm_head)  # the tied head, written as llama.cpp's converter writes it


def _interleaved(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q or k from HF's half-split rotary pairs (i, i + D/2) to interleaved ones (2i, 2i + 1)."""
    return weight.reshape(heads, 2, weight.size(0) // heads // 2, -1).transpose(1, 2).reshape(weight.shape)


def _llama_tensors(model: Llama):
    c = model.config
    yield "token_embd.weight", _weight(model.model.embed_tokens)
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        yield f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight
        yield f"blk.{i}.attn_q.weight", _interleaved(_weight(a.q_proj), c.n_heads)
        yield f"blk.{i}.attn_k.weight", _interleaved(_weight(a.k_proj), c.n_kv_heads)
        yield f"blk.{i}.attn_v.weight", _weight(a.v_proj)
        yield f"blk.{i}.attn_output.weight", _weight(a.o_proj)
        yield f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight
        yield f"blk.{i}.ffn_gate.weight", _weight(m.gate_proj)
        yield f"blk.{i}.ffn_up.weight", _weight(m.up_proj)
        yield f"blk.{i}.ffn_down.weight", _weight(m.down_proj)
    yield "output_norm.weight", model.model.norm.weight
    if not c.tie_embeddings:
        yield "output.weight", _weight(model.lm_head)


def _architecture(writer, model) -> None:
    if isinstance(model, GPT2):
        c = model.config
        writer.add_context_length(c.block_size)
        writer.add_embedding_length(c.n_embd)
        writer.add_feed_forward_length(4 * c.n_embd)
        writer.add_block_count(c.n_layer)
        writer.add_head_count(c.n_head)
        writer.add_layer_norm_eps(model.transformer.ln_f.eps)
        return
    c = model.config
    writer.add_vocab_size(c.vocab_size)
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.dim)
    writer.add_feed_forward_length(c.hidden_dim)
    writer.add_block_count(c.n_layers)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)


def _tokenizer(writer, tokenizer, model) -> None:
    """The whole vocabulary: llama.cpp's `gpt2` (byte-level BPE: tokens and merges) or `llama` (SentencePiece)."""
    import gguf

    vocab = model.config.vocab_size
    if isinstance(tokenizer, BPETokenizer) and tokenizer.name == "gpt2":
        tokens, merges = gpt2_vocabulary(tokenizer)
        if len(tokens) != vocab:
            raise ConfigError(f"format=gguf: the model's vocabulary has {vocab} rows but GPT-2's BPE {len(tokens)} "
                              f"tokens; GGUF readers expect one row a token")
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types([gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL])
        writer.add_token_merges(merges)
        writer.add_bos_token_id(tokenizer.eot_id)
        writer.add_eos_token_id(tokenizer.eot_id)
        writer.add_add_bos_token(False)
        return
    if isinstance(tokenizer, SentencePieceTokenizer):
        sp = tokenizer.processor
        if sp.get_piece_size() != vocab:
            raise ConfigError(f"format=gguf: the model's vocabulary has {vocab} rows but its SentencePiece model "
                              f"{sp.get_piece_size()} pieces; GGUF readers expect one row a token")
        types = [gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
                 else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.UNUSED if sp.is_unused(i)
                 else gguf.TokenType.NORMAL for i in range(vocab)]
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list([sp.id_to_piece(i) for i in range(vocab)])
        writer.add_token_scores([sp.get_score(i) for i in range(vocab)])
        writer.add_token_types(types)
        for add, token in ((writer.add_bos_token_id, sp.bos_id()), (writer.add_eos_token_id, sp.eos_id()),
                           (writer.add_unk_token_id, sp.unk_id())):
            if token >= 0:
                add(token)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        return
    raise ConfigError(f"format=gguf: the model's tokenizer ({getattr(tokenizer, 'name', type(tokenizer).__name__)}) "
                      f"is neither GPT-2's BPE nor SentencePiece, the two that llama.cpp's gpt2 and llama models "
                      f"read; a character-level model has no GGUF tokenizer to carry it")


def gpt2_vocabulary(tokenizer: BPETokenizer) -> tuple[list[str], list[str]]:
    """GPT-2's tokens as byte-level BPE strings (bytes mapped to printable characters, as in HF's vocab.json) and
    its merges ("Ġ t"), rebuilt from tiktoken's ranks: the merge that makes a token is the last step of BPE over
    its own bytes with the ranks below its own."""
    encoding = tokenizer.encoding
    ranks = encoding._mergeable_ranks
    printable = _bytes_to_unicode()
    text = {token: "".join(printable[b] for b in token) for token in ranks}
    tokens = [""] * len(ranks)
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        tokens[rank] = text[token]
        if len(token) > 1:
            left, right = _last_merge(ranks, token, rank)
            merges.append(f"{text[left]} {text[right]}")
    special = sorted(encoding._special_tokens.items(), key=lambda item: item[1])
    return tokens + [name for name, _ in special], merges


def _last_merge(ranks: dict[bytes, int], token: bytes, rank: int) -> tuple[bytes, bytes]:
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        merged = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        best, i = min(merged)
        if best >= rank:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise ValueError(f"GPT-2's token {token!r} is not one merge of two tokens below it")
    return parts[0], parts[1]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 bytes to printable characters (OpenAI's encoder.py)."""
    kept = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {b: chr(b) for b in kept}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars
