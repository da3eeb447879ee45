"""GGUF, the file llama.cpp, Ollama and LM Studio run: a GPT-2 or LLaMA written whole, so a GGUF reader needs
nothing else (`write`), and read back from the file alone, dequantized to float32
(`read`). The file carries llama.cpp's architecture metadata (`gpt2`, `llama`), the whole tokenizer (GPT-2's
byte-level BPE vocabulary and merges; SentencePiece's pieces, scores and types) and every weight under llama.cpp's
tensor names, in f32, f16, q8_0 or q4_0 (blocks of 32 weights sharing an f16 scale).

As llama.cpp's own converter does: 1-D tensors (norms, biases) stay f32; the q and k projections of a LLaMA are
permuted from HF's half-split rotary layout to the interleaved one llama.cpp rotates; GPT-2's tied head is written
as `output.weight` too. A weight whose rows a quantization's block does not divide is written in f16. Reading
undoes each of these, and takes every quantization gguf's numpy code dequantizes (Q4_0 to Q6_K, IQ*, ...).
GGUF has no field for a SentencePiece normalizer: a tokenizer read from a file keeps runs of spaces, as
llama.cpp and Meta's LLaMA tokenizer do.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from gptexp.core.config import ConfigError
from gptexp.data.tokenizers import BPETokenizer, SentencePieceTokenizer, gpt2_tokenizer
from gptexp.inference.quantize import QuantizedEmbedding, QuantizedLinear
from gptexp.models import GPT2, GPT2Config, Llama, LlamaConfig
from gptexp.weights.meta import half_to_interleaved, interleaved_to_half
from gptexp.weights.source import Source, assemble

DTYPES = ("f32", "f16", "q8_0", "q4_0")
NAMES = {"block_size": "context_length", "max_seq_len": "context_length", "n_embd": "embedding_length",
         "dim": "embedding_length", "hidden_dim": "feed_forward_length", "n_layer": "block_count",
         "n_layers": "block_count", "n_head": "attention.head_count", "n_heads": "attention.head_count",
         "n_kv_heads": "attention.head_count_kv"}  # gptexp's config fields as GGUF's metadata keys name them
INSTALL = 'pip install gguf (or pip install -e ".[gguf]")'
BLOCK = 32  # weights a q8_0 or q4_0 block holds


def write(model: nn.Module, tokenizer, path: str | Path, dtype: str = "f16") -> None:
    """Write `model` (GPT2 or Llama, float or quantized by gptexp) and its tokenizer to `path` as GGUF with 2-D
    weights in `dtype`. Raises ConfigError for a dtype, model or tokenizer GGUF cannot carry, or without gguf."""
    gguf = require_gguf()

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


def require_gguf():
    """The gguf package, or ConfigError with its install line."""
    try:
        import gguf
    except ImportError:
        raise ConfigError(f"GGUF files need the gguf package: {INSTALL}") from None
    return gguf


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


def _llama_tensors(model: Llama):
    c = model.config
    yield "token_embd.weight", _weight(model.model.embed_tokens)
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        yield f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight
        yield f"blk.{i}.attn_q.weight", half_to_interleaved(_weight(a.q_proj), c.n_heads)
        yield f"blk.{i}.attn_k.weight", half_to_interleaved(_weight(a.k_proj), c.n_kv_heads)
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
        tokens, merges = gpt2_vocabulary()
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


@cache
def gpt2_vocabulary() -> tuple[list[str], list[str]]:
    """GPT-2's tokens as byte-level BPE strings (bytes mapped to printable characters, as in HF's vocab.json) and
    its merges ("Ġ t"), rebuilt from tiktoken's ranks: the merge that makes a token is the last step of BPE over
    its own bytes with the ranks below its own. Built once (0.6 s)."""
    encoding = gpt2_tokenizer().encoding
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


def read(path: Path, overrides: dict | None = None, with_tokenizer: bool = True) -> Source:
    """The model of a GGUF file of llama.cpp's `gpt2` or `llama` architecture, every weight dequantized to float32,
    with the tokenizer the file carries. Raises ConfigError naming what is wrong: not a GGUF file (or a truncated
    one), another architecture, a tensor type gguf cannot dequantize, or a layout gptexp's models do not have (or
    without gguf installed)."""
    gguf = require_gguf()
    reader, value, architecture = _open(path)
    tensors = {}
    for tensor in reader.tensors:
        kind = gguf.GGMLQuantizationType(tensor.tensor_type)
        try:
            array = gguf.quants.dequantize(tensor.data, kind)
        except NotImplementedError:
            raise ConfigError(f"{path}: tensor {tensor.name} is {kind.name}, which gptexp cannot dequantize; it reads "
                              f"f32, f16, bf16 and the q4_0 to q6_k and iq* quantizations") from None
        shape = tuple(reversed([int(n) for n in tensor.shape]))
        tensors[tensor.name] = torch.from_numpy(np.array(array, dtype=np.float32).reshape(shape))  # a copy: off the map
    needed = [f"{architecture}.{key}" for key in ("context_length", "embedding_length", "feed_forward_length",
                                                  "block_count", "attention.head_count")]
    missing = [key for key in needed if value(key) is None] + [n for n in ("token_embd.weight",) if n not in tensors]
    if missing:
        raise ConfigError(f"{path} lacks what a {architecture} model needs: {', '.join(missing)}")
    config, state = (_gpt2_from if architecture == "gpt2" else _llama_from)(value, tensors, path)
    missing = [name for name, tensor in state.items() if tensor is None]
    if missing:
        raise ConfigError(f"{path} lacks tensors a {architecture} model needs: the GGUF names of {missing[:3]}")
    names = {field: f"{architecture}.{key}" for field, key in NAMES.items()}
    model = assemble(config, state, path, overrides=overrides, names=names)
    return Source(model, _tokenizer_from(value, architecture, path) if with_tokenizer else None, f"GGUF {path}")


def tokenizer(path: Path):
    """The tokenizer a GGUF file carries: GPT-2's BPE, or its SentencePiece model rebuilt from the file."""
    _, value, architecture = _open(path)
    return _tokenizer_from(value, architecture, path)


def _open(path: str | Path):
    """(reader, value, architecture) of a GGUF file: `value(key, default)` reads a metadata value (a float32 one,
    1e-5 read as 9.99999974e-06, to the 7 digits it holds). Raises ConfigError for an unreadable file or an
    architecture gptexp lacks."""
    gguf = require_gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as error:  # what a short or foreign file raises in gguf's reader
        raise ConfigError(f"{path} is not a readable GGUF file ({error}): truncated, or not GGUF") from None

    def value(key, default=None):
        found = reader.fields[key].contents() if key in reader.fields else default
        return float(f"{found:.7g}") if isinstance(found, float) else found

    architecture = value("general.architecture")
    if architecture not in ("gpt2", "llama"):
        raise ConfigError(f"{path} holds a {architecture!r} model; gptexp reads GGUF's gpt2 and llama architectures")
    return reader, value, architecture


def _gpt2_from(value, tensors: dict, path):
    width, ff = value("gpt2.embedding_length"), value("gpt2.feed_forward_length")
    if ff != 4 * width or abs(value("gpt2.attention.layer_norm_epsilon", 1e-5) - 1e-5) > 1e-9:
        raise ConfigError(f"{path}: a GPT-2 variant (feed-forward {ff} for width {width}, or a LayerNorm epsilon "
                          f"other than 1e-5) that gptexp's GPT-2 does not implement")
    embedding = tensors["token_embd.weight"]
    if "output.weight" in tensors and not torch.equal(tensors["output.weight"], embedding):
        raise ConfigError(f"{path}: its output head differs from its token embedding; gptexp's GPT-2 ties them")
    config = GPT2Config(block_size=value("gpt2.context_length"), vocab_size=embedding.size(0),
                        n_layer=value("gpt2.block_count"), n_head=value("gpt2.attention.head_count"), n_embd=width,
                        bias="output_norm.bias" in tensors)
    parts = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    state = {"transformer.wte.weight": embedding, "transformer.wpe.weight": tensors.get("position_embd.weight"),
             "transformer.ln_f.weight": tensors.get("output_norm.weight"), "lm_head.weight": embedding}
    for i in range(_blocks(tensors)):  # those the file holds: check_claims holds its block_count against them
        for ours, theirs in parts.items():
            for kind in ("weight", "bias") if config.bias else ("weight",):
                state[f"transformer.h.{i}.{ours}.{kind}"] = tensors.get(f"blk.{i}.{theirs}.{kind}")
    if config.bias:
        state["transformer.ln_f.bias"] = tensors.get("output_norm.bias")
    return config, state


def _llama_from(value, tensors: dict, path):
    heads = value("llama.attention.head_count")
    embedding = tensors["token_embd.weight"]
    config = LlamaConfig(dim=value("llama.embedding_length"), n_layers=value("llama.block_count"), n_heads=heads,
                         n_kv_heads=value("llama.attention.head_count_kv", heads), vocab_size=embedding.size(0),
                         hidden_dim=value("llama.feed_forward_length"),
                         norm_eps=value("llama.attention.layer_norm_rms_epsilon", 1e-5),
                         rope_theta=value("llama.rope.freq_base", 10000.0), max_seq_len=value("llama.context_length"),
                         tie_embeddings="output.weight" not in tensors)
    state = {"model.embed_tokens.weight": embedding, "model.norm.weight": tensors.get("output_norm.weight"),
             "lm_head.weight": tensors.get("output.weight", embedding)}
    parts = {"input_layernorm": "attn_norm", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(_blocks(tensors)):
        for ours, theirs in parts.items():
            state[f"model.layers.{i}.{ours}.weight"] = tensors.get(f"blk.{i}.{theirs}.weight")
        for ours, theirs, count in (("q_proj", "attn_q", config.n_heads), ("k_proj", "attn_k", config.n_kv_heads)):
            weight = tensors.get(f"blk.{i}.{theirs}.weight")
            state[f"model.layers.{i}.self_attn.{ours}.weight"] = None if weight is None else interleaved_to_half(weight, count)
    return config, state


def _blocks(tensors: dict) -> int:
    """How many blocks a GGUF file's tensors hold (blk.0. to blk.N.)."""
    return 1 + max((int(name.split(".")[1]) for name in tensors if name.startswith("blk.")), default=-1)


def _tokenizer_from(value, architecture: str, path):
    kind = value("tokenizer.ggml.model")
    tokens = value("tokenizer.ggml.tokens")
    if architecture == "gpt2" and kind == "gpt2":
        if tokens != gpt2_vocabulary()[0]:
            raise ConfigError(f"{path}: its BPE vocabulary is not GPT-2's, the only BPE gptexp's GPT-2 reads")
        return gpt2_tokenizer()
    if architecture == "llama" and kind == "llama":
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        types = value("tokenizer.ggml.token_type")
        for piece, score, token_type in zip(tokens, value("tokenizer.ggml.scores"), types):
            entry = proto.pieces.add()
            entry.piece, entry.score, entry.type = piece, score, token_type  # GGUF numbers SentencePiece's types alike
        spec = proto.trainer_spec
        spec.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
        spec.byte_fallback = 6 in types
        spec.unk_id = value("tokenizer.ggml.unknown_token_id", 0)
        spec.bos_id = value("tokenizer.ggml.bos_token_id", -1)
        spec.eos_id = value("tokenizer.ggml.eos_token_id", -1)
        spec.pad_id = -1
        normalizer = proto.normalizer_spec
        normalizer.name, normalizer.add_dummy_prefix = "identity", True
        normalizer.remove_extra_whitespaces, normalizer.escape_whitespaces = False, True
        return SentencePieceTokenizer(model_bytes=proto.SerializeToString())
    raise ConfigError(f"{path}: a {architecture} model with a {kind!r} tokenizer; gptexp reads GPT-2's BPE with gpt2 "
                      f"and SentencePiece (llama) with llama")
