"""Write a model in another format: python -m gptexp export format=llmc|hf|quantized|gguf source=<...> output=<...>

source: any model gptexp reads (gptexp.weights): a run directory (its last checkpoint, or checkpoint=best), a
.ckpt file (a LoRA run's with its adapter merged in), an HF directory or hub id, or an llm.c .bin. For a GPT-2,
format=llmc writes llm.c's model file (and with state=<path>, a debug state for a
batch of random tokens); format=hf writes a directory transformers.GPT2LMHeadModel reads. format=quantized (GPT-2 or
LLaMA) writes one .safetensors of the model quantized to quantize=int8|int4, with its tokenizer, that every
command reads as source= without quantizing again. format=gguf (GPT-2 or LLaMA) writes one .gguf file that
llama.cpp, Ollama and LM Studio run, its 2-D weights in dtype=f32|f16|q8_0|q4_0 (gptexp.weights.gguf).
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from gptexp.commands.cli import answered_errors, run_command
from gptexp.core.config import CONF_DIR, ConfigError
from gptexp.core.writing import replacing, writing
from gptexp.inference import quantize as quantization
from gptexp.models import GPT2
from gptexp.weights import load_source, quantized, save_hf
from gptexp.weights.llmc import write_model, write_state

SUFFIXES = {"llmc": ".bin", "quantized": ".safetensors", "gguf": ".gguf"}  # of the one file each format writes


def load_gpt2(source: str, checkpoint: str = "last", trust: bool = False) -> GPT2:
    """The GPT-2 `source` names (any format gptexp.weights reads; a LoRA run's adapter merged in)."""
    model = load_source(source, checkpoint, trust).model
    if not isinstance(model, GPT2):
        raise ConfigError(f"source={source} holds a {type(model).__name__}; only GPT-2 exports to these formats")
    return model.float().eval()


def check_outputs(cfg: DictConfig) -> None:
    """ConfigError, before any work, for a path the format cannot write: a directory where a file goes, a file
    where format=hf's directory goes. A missing output= is left to be reported where it is read, after source=."""
    if OmegaConf.is_missing(cfg, "output"):
        return
    if cfg.format == "hf":
        if Path(str(cfg.output)).is_file():
            raise ConfigError(f"output={cfg.output} is a file; format=hf writes a directory: name a new one")
        return
    for key, example in (("output", f"model{SUFFIXES[cfg.format]}"), ("state", "state.bin")):
        value = cfg[key] if key == "output" or cfg.format == "llmc" else None
        if value and Path(str(value)).is_dir():
            raise ConfigError(f"{key}={value} is a directory; format={cfg.format} writes one file: name it, e.g. "
                              f"{key}={Path(str(value)) / example}")


def export(cfg: DictConfig) -> None:
    if cfg.format not in ("llmc", "hf", "quantized", "gguf"):
        raise ConfigError(f"format={cfg.format!r}: choose llmc, hf, quantized or gguf")
    check_outputs(cfg)
    if cfg.format == "quantized":
        return export_quantized(cfg)
    if cfg.format == "gguf":
        return export_gguf(cfg)
    model = load_gpt2(str(cfg.source), cfg.checkpoint, cfg.trust_checkpoint)
    if cfg.format == "hf":
        with writing(cfg.output):
            save_hf(model, cfg.output)
        return print(f"wrote {cfg.output}")
    with writing(cfg.output):
        write_model(model, cfg.output)
    if cfg.state:
        generator = torch.Generator().manual_seed(cfg.seed)
        seq_len = cfg.state_seq_len or min(64, model.config.block_size)
        tokens = torch.randint(0, model.config.vocab_size, (cfg.state_batch, seq_len + 1), generator=generator)
        with writing(cfg.state):
            write_state(model, tokens[:, :-1], tokens[:, 1:], cfg.state)
    print(f"wrote {cfg.output}" + (f" and {cfg.state}" if cfg.state else ""))


def export_quantized(cfg: DictConfig) -> None:
    quantization.check(cfg.quantize, cfg.quantize_group_size)
    if not cfg.quantize:
        raise ConfigError("format=quantized needs quantize=int8 or quantize=int4")
    if not str(cfg.output).endswith(".safetensors"):
        raise ConfigError(f"output={cfg.output}: a quantized model is one .safetensors file; name it <name>.safetensors")
    source = load_source(str(cfg.source), cfg.checkpoint, cfg.trust_checkpoint)
    source.place("cpu", cfg.precision, cfg.quantize, cfg.quantize_group_size)
    with writing(cfg.output):
        quantized.write(source, cfg.output)
    print(f"wrote {cfg.output} ({cfg.quantize}, {Path(cfg.output).stat().st_size / 1e6:.1f} MB)")


def export_gguf(cfg: DictConfig) -> None:
    from gptexp.weights.gguf import DTYPES, require_gguf, write

    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype={cfg.dtype!r}: format=gguf writes {', '.join(DTYPES)}")
    output = Path(str(cfg.output))
    if output.suffix != ".gguf":
        raise ConfigError(f"output={output}: a GGUF model is one .gguf file; name it <name>.gguf")
    require_gguf()  # before the source loads
    source = load_source(str(cfg.source), cfg.checkpoint, cfg.trust_checkpoint)
    with replacing(output) as partial:  # renamed into place whole: no half a file
        write(source.model, source.tokenizer, partial, cfg.dtype)
    print(f"wrote {output} ({cfg.dtype}, {output.stat().st_size / 1e6:.1f} MB)")


@hydra.main(version_base="1.3", config_path=f"{CONF_DIR}/tools", config_name="export")
def main(cfg: DictConfig) -> None:
    with answered_errors():
        export(cfg)


if __name__ == "__main__":
    run_command(main)
