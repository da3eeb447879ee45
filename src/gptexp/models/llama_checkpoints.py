"""LLaMA checkpoint formats, all converted to HF's parameter names and rotary layout.

- Hugging Face: a directory with config.json and safetensors (single or sharded) or .bin files.
- Meta: a directory with params.json and consolidated.NN.pth, one file per model-parallel rank
  (13B: 2, 70B: 8), merged along the dimension each layer was split on (MERGE_DIM).
- llama2.c: the legacy .bin export, a 7-int header then float32 weights.

Each reader returns the model's LlamaConfig fields (a dict) and its tensors under HF's names; llama.py builds
the model from them, so this module never imports it.

Meta and llama2.c store each head's wq/wk rows with the two halves of a rotary pair side by side
(0, 1), (2, 3), ...; HF places them D/2 apart (0, D/2), (1, D/2 + 1), ...: `interleaved_to_half`.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import torch

from gptexp.models.pretrained import load_hf_state_dict, read_json, resolve_pretrained
from gptexp.safe_load import torch_load

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
LLAMA2C_MAGIC = 0x616B3432  # "ak42": llama2.c's versioned exports, which this reader does not take


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q or k projection from Meta's rotary layout to HF's, head by head."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of interleaved_to_half: HF's rotary layout back to Meta's."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


Weights = tuple[dict, dict[str, torch.Tensor], Path]  # LlamaConfig fields, tensors by HF name, where they came from


def read_llama(path_or_id: str | os.PathLike) -> Weights:
    """Detect the format of `path_or_id` and read it (see the module docstring). The tensors hold lm_head.weight
    only where the config does not tie it to the embedding."""
    path = Path(path_or_id).expanduser()
    if path.is_file():
        return read_llama2c(path)
    if not path.exists():
        path = resolve_pretrained(path_or_id, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"])
    if (path / "params.json").exists():
        return read_meta(path)
    if (path / "config.json").exists():
        return read_hf(path)
    raise FileNotFoundError(f"{path} is not a LLaMA checkpoint: expected a Hugging Face directory (config.json), "
                            f"a Meta directory (params.json + consolidated.*.pth) or a llama2.c .bin file")


def tokenizer_file(path_or_id: str | os.PathLike) -> Path:
    """The SentencePiece model that belongs to a checkpoint: tokenizer.model in an HF directory, in a Meta
    directory or its parent (Meta's download layout), the one *.model file beside a llama2.c .bin, or the one a
    .gguf file carries (written to gptexp's cache)."""
    path = Path(path_or_id).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        from gptexp.models.gguf_files import sentencepiece_file

        return sentencepiece_file(path)
    if not path.exists():
        path = resolve_pretrained(path_or_id, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"])
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


# --- Hugging Face -------------------------------------------------------------------------------

def config_from_hf(hf: dict) -> dict:
    unsupported = {
        "hidden_act": hf.get("hidden_act", "silu") != "silu",
        "attention_bias": hf.get("attention_bias", False),
        "mlp_bias": hf.get("mlp_bias", False),
        "rope_scaling": bool(hf.get("rope_scaling")) and hf["rope_scaling"].get("rope_type", "default") != "default",
        "head_dim": hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
        != hf["hidden_size"] // hf["num_attention_heads"],
    }
    if any(unsupported.values()):
        raise ValueError(f"unsupported LLaMA variant in config.json: {[k for k, v in unsupported.items() if v]}")
    rope = hf.get("rope_parameters") or {}
    return dict(dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                n_kv_heads=hf.get("num_key_value_heads"), vocab_size=hf["vocab_size"],
                hidden_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=hf.get("rope_theta", rope.get("rope_theta", 10000.0)),
                max_seq_len=hf.get("max_position_embeddings", 4096), tie_embeddings=hf.get("tie_word_embeddings", False))


def config_to_hf(config: dict) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": config["dim"],
            "num_hidden_layers": config["n_layers"], "num_attention_heads": config["n_heads"],
            "num_key_value_heads": config["n_kv_heads"], "vocab_size": config["vocab_size"],
            "intermediate_size": config["hidden_dim"], "rms_norm_eps": config["norm_eps"],
            "rope_theta": config["rope_theta"], "max_position_embeddings": config["max_seq_len"],
            "tie_word_embeddings": config["tie_embeddings"], "hidden_act": "silu", "bos_token_id": 1,
            "eos_token_id": 2, "torch_dtype": "float32"}


def read_hf(directory: Path) -> Weights:
    config = config_from_hf(read_json(directory / "config.json"))
    state = {k: v for k, v in load_hf_state_dict(directory).items() if not k.endswith("rotary_emb.inv_freq")}
    if config["tie_embeddings"]:
        state.pop("lm_head.weight", None)
    return config, state, directory


def write_hf(config: dict, state: dict[str, torch.Tensor], directory: str | os.PathLike) -> None:
    """config.json + model.safetensors that transformers.LlamaForCausalLM.from_pretrained reads."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in state.items() if not (config["tie_embeddings"] and k == "lm_head.weight")}
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config_to_hf(config), indent=2))


# --- Meta ---------------------------------------------------------------------------------------

def read_meta(directory: Path) -> Weights:
    params = read_json(directory / "params.json")
    shards = sorted(directory.glob("consolidated.*.pth"))
    if not shards:
        raise FileNotFoundError(f"{directory} has params.json but no consolidated.*.pth weight files")
    parts = [torch_load(s, mmap=True) for s in shards]
    state = {}
    for key in parts[0]:
        if key == "rope.freqs":
            continue
        layer = re.match(r"layers\.(\d+)\.(.+)", key)
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
    vocab_size, hidden_dim = state["model.embed_tokens.weight"].shape[0], state["model.layers.0.mlp.gate_proj.weight"].shape[0]
    config = dict(dim=dim, n_layers=params["n_layers"], n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab_size,
                  hidden_dim=hidden_dim, norm_eps=params.get("norm_eps", 1e-5),
                  rope_theta=params.get("rope_theta", 10000.0), max_seq_len=params.get("max_seq_len", 4096),
                  tie_embeddings=False)
    return config, state, directory


# --- llama2.c -----------------------------------------------------------------------------------

def read_llama2c(path: Path) -> Weights:
    """llama2.c's legacy export: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size (negative:
    a separate classifier follows), seq_len; then float32 tensors in the order below."""
    raw = path.read_bytes()
    if len(raw) < 28:
        raise ValueError(f"{path} is too short to be a llama2.c checkpoint ({len(raw)} bytes)")
    if struct.unpack("<I", raw[:4])[0] == LLAMA2C_MAGIC:
        raise ValueError(f"{path} is a versioned llama2.c export (magic 'ak42'); only the legacy format is read: "
                         f"export with llama2.c's `export.py --version 0`")
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = struct.unpack("<7i", raw[:28])
    if min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, seq_len) <= 0 or vocab_size == 0:
        raise ValueError(f"{path}: header {dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len} "
                         f"is not a llama2.c legacy header")
    shared, vocab_size = vocab_size > 0, abs(vocab_size)
    config = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab_size,
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
    expected = 28 + 4 * sum(int(np.prod(shape)) for _, shape in layout)
    if len(raw) != expected:
        raise ValueError(f"{path}: the header describes {expected} bytes but the file has {len(raw)} "
                         f"(truncated, or not a llama2.c legacy export)")
    values, offset, state = np.frombuffer(raw, dtype="<f4", offset=28), 0, {}
    for name, shape in layout:
        size = int(np.prod(shape))
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
    return config, state, path
