"""Hugging Face directories (config.json + safetensors or .bin, single or sharded): GPT2LMHeadModel's and
LlamaForCausalLM's, read into gptexp's models and written back for transformers.

gptexp's parameter names are HF's. GPT-2 differs only in its four Conv1D weights (CONV1D_WEIGHTS), stored (in, out)
where nn.Linear holds (out, in), and in the `transformer.` prefix a bare GPT2Model omits. A LLaMA's tensors load as
they are (HF's rotary layout is gptexp's).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from gptexp import finetune
from gptexp.core.config import ConfigError
from gptexp.core.safe_load import torch_load
from gptexp.core.writing import writing
from gptexp.data.tokenizers import gpt2_tokenizer
from gptexp.models import GPT2, GPT2Config, LanguageModel, Llama, LlamaConfig
from gptexp.weights import meta
from gptexp.weights.source import Source, assemble

log = logging.getLogger(__name__)

# HF stores these four as Conv1D weights, shape (in, out); nn.Linear wants (out, in).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# gptexp's config fields as config.json names them, for the messages of gptexp.weights.source.check_claims
GPT2_NAMES = {field: f"config.json's {key}" for field, key in (
    ("block_size", "n_positions"), ("vocab_size", "vocab_size"), ("n_layer", "n_layer"), ("n_head", "n_head"),
    ("n_embd", "n_embd"))}
LLAMA_NAMES = {field: f"config.json's {key}" for field, key in (
    ("dim", "hidden_size"), ("n_layers", "num_hidden_layers"), ("n_heads", "num_attention_heads"),
    ("n_kv_heads", "num_key_value_heads"), ("vocab_size", "vocab_size"), ("hidden_dim", "intermediate_size"),
    ("max_seq_len", "max_position_embeddings"))}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def read(directory: Path, overrides: dict | None = None, with_tokenizer: bool = True) -> Source:
    """The GPT-2 or LLaMA of an HF directory, with its tokenizer (GPT-2's BPE; a LLaMA's tokenizer.model)."""
    hf = read_json(directory / "config.json")
    kind = model_type(hf, directory)
    try:
        config = gpt2_config_from_hf(hf) if kind == "gpt2" else LlamaConfig(**llama_config_from_hf(hf))
    except (KeyError, TypeError) as error:
        raise ValueError(f"{directory}/config.json is not a whole {kind} config ({type(error).__name__}: {error}); "
                         f"write it as transformers does") from None
    if kind == "gpt2":
        model = assemble(config, gpt2_state_from_hf(read_state(directory)), directory, overrides=overrides,
                         names=GPT2_NAMES)
        return Source(model, gpt2_tokenizer() if with_tokenizer else None, f"HF GPT-2 {directory}")
    state = {k: v for k, v in read_state(directory).items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return Source(assemble(config, state, directory, overrides=overrides, names=LLAMA_NAMES),
                  meta.tokenizer(directory) if with_tokenizer else None,
                  f"HF LLaMA {directory}")


def tokenizer(directory: Path):
    """The tokenizer that belongs to an HF directory: GPT-2's BPE, or a LLaMA's tokenizer.model (in the directory,
    or its parent as Meta's downloads place it)."""
    if model_type(read_json(directory / "config.json"), directory) == "gpt2":
        return gpt2_tokenizer()
    return meta.tokenizer(directory)


def model_type(hf: dict, directory: Path) -> str:
    """The model_type of `directory`'s config.json (`hf`), one of those gptexp reads (gpt2, llama); ConfigError for
    another."""
    found = hf.get("model_type")
    if found not in ("gpt2", "llama"):
        raise ConfigError(f"{directory}/config.json has model_type {found!r}; gptexp reads gpt2 and llama")
    return found


def write(model: LanguageModel, directory: str | os.PathLike) -> None:
    """config.json + model.safetensors that transformers' GPT2LMHeadModel / LlamaForCausalLM.from_pretrained reads."""
    from safetensors.torch import save_file

    if isinstance(model, GPT2):
        if not model.config.bias:
            raise ValueError("HF's GPT-2 has biases everywhere; a bias=False model cannot be saved in its format")
        config, state = gpt2_config_to_hf(model.config), gpt2_state_to_hf(model.state_dict())
    elif isinstance(model, Llama):
        fields = asdict(model.config)
        config = llama_config_to_hf(fields)
        state = {k: v.contiguous() for k, v in model.state_dict().items()
                 if not (fields["tie_embeddings"] and k == "lm_head.weight")}
    else:
        raise ValueError(f"HF's format holds a GPT2 or a Llama, not a {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def write_lora(model: nn.Module, directory: str | Path, merged: bool = False) -> None:
    """Write a LoRA model's adapter in peft's format (adapter_config.json + adapter_model.safetensors) to
    `directory/adapter`, and with `merged` the base with the adapter folded in to `directory/merged` (HF format). A
    model without an adapter (a full finetune) has nothing to add."""
    if "peft" not in sys.modules:  # no adapter was made in this process (importing peft costs a second or two)
        return
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return
    directory = Path(directory)
    with writing(directory / "adapter"):
        model.save_pretrained(directory / "adapter")
    log.info("LoRA adapter saved to %s", directory / "adapter")
    if merged:
        with writing(directory / "merged"):
            write(finetune.merge(model), directory / "merged")
        log.info("merged model saved to %s", directory / "merged")


def read_json(path: Path) -> dict:
    """A JSON object from `path`; ValueError for anything else (JSONDecodeError is one)."""
    with open(path) as f:
        found = json.load(f)
    if not isinstance(found, dict):
        raise ValueError(f"{path} holds a JSON {type(found).__name__}, not the object of keys it should")
    return found


def read_state(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF checkpoint directory: single or sharded safetensors, else .bin (read weights-only)."""
    from safetensors.torch import load_file

    if (directory / "model.safetensors").exists():
        return load_file(directory / "model.safetensors")
    if (directory / "model.safetensors.index.json").exists():
        shards = sorted(set(read_json(directory / "model.safetensors.index.json")["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(directory / shard).items()}
    if (directory / "pytorch_model.bin").exists():
        return torch_load(directory / "pytorch_model.bin")
    if (directory / "pytorch_model.bin.index.json").exists():
        shards = sorted(set(read_json(directory / "pytorch_model.bin.index.json")["weight_map"].values()))
        return {k: v for shard in shards for k, v in torch_load(directory / shard).items()}
    raise FileNotFoundError(f"no weights in {directory}: expected one of {', '.join(WEIGHT_FILES)}")


# --- GPT-2 ----------------------------------------------------------------------------------------

def gpt2_state_from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF GPT-2 tensors -> gptexp names: add the `transformer.` prefix where a GPT2Model saved them,
    drop the causal-mask buffers of old checkpoints, transpose Conv1D weights, tie lm_head to wte."""
    state = {}
    for key, tensor in hf_state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
            continue
        key = key if key.startswith("transformer.") else "transformer." + key
        state[key] = tensor.t() if key.endswith(CONV1D_WEIGHTS) else tensor
    if "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def gpt2_state_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """gptexp tensors -> GPT2LMHeadModel's names and layout (the tied lm_head is not stored)."""
    return {key: (tensor.t() if key.endswith(CONV1D_WEIGHTS) else tensor).contiguous()
            for key, tensor in state.items() if key != "lm_head.weight"}


def gpt2_config_from_hf(hf: dict) -> GPT2Config:
    """Read an HF GPT-2 config.json, refusing variants gptexp's GPT-2 does not implement."""
    unsupported = {
        "activation_function": hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"),
        "layer_norm_epsilon": hf.get("layer_norm_epsilon", 1e-5) != 1e-5,
        "n_inner": hf.get("n_inner") not in (None, 4 * hf["n_embd"]),
        "scale_attn_by_inverse_layer_idx": hf.get("scale_attn_by_inverse_layer_idx", False),
        "tie_word_embeddings": not hf.get("tie_word_embeddings", True),
    }
    if any(unsupported.values()):
        raise ValueError(f"unsupported GPT-2 variant in config.json: {[k for k, v in unsupported.items() if v]}")
    return GPT2Config(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                      n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True)


def gpt2_config_to_hf(config: GPT2Config) -> dict:
    hf = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
          "n_positions": config.block_size, "n_embd": config.n_embd, "n_layer": config.n_layer,
          "n_head": config.n_head, "n_inner": None, "activation_function": "gelu_new",
          "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
          "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "tie_word_embeddings": True}
    eot = 50256 if config.vocab_size > 50256 else None  # GPT-2's <|endoftext|>, where the vocabulary has it
    return hf | {"bos_token_id": eot, "eos_token_id": eot}


# --- LLaMA ----------------------------------------------------------------------------------------

def llama_config_from_hf(hf: dict) -> dict:
    """LlamaConfig's fields from an HF LLaMA config.json, refusing variants gptexp's LLaMA does not implement."""
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


def llama_config_to_hf(config: dict) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": config["dim"],
            "num_hidden_layers": config["n_layers"], "num_attention_heads": config["n_heads"],
            "num_key_value_heads": config["n_kv_heads"], "vocab_size": config["vocab_size"],
            "intermediate_size": config["hidden_dim"], "rms_norm_eps": config["norm_eps"],
            "rope_theta": config["rope_theta"], "max_position_embeddings": config["max_seq_len"],
            "tie_word_embeddings": config["tie_embeddings"], "hidden_act": "silu", "bos_token_id": 1,
            "eos_token_id": 2, "torch_dtype": "float32"}
