"""Write a GPT-2 in another format: python -m gptexp export format=llmc source=<...> output=<...>

source: a run directory (its checkpoints/last.ckpt) or a .ckpt file, an HF GPT-2 directory or hub id,
or an llm.c .bin. format=llmc writes llm.c's model file (and with state=<path>, a debug state for a
batch of random tokens); format=hf writes a directory transformers.GPT2LMHeadModel reads.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from gptexp.checkpoints import load, resolve_ckpt_path
from gptexp.cli import answered_errors, run_command
from gptexp.config import CONF_DIR, ConfigError
from gptexp.models import ARCHITECTURES, GPT2
from gptexp.models.llmc import read_model, write_model, write_state
from gptexp.writing import writing


def load_checkpoint(path: str | Path) -> torch.nn.Module:
    """The model of a gptexp training checkpoint (the architecture is stored in it)."""
    checkpoint = load(path)  # a Lightning checkpoint: trusted, yours
    if "gptexp_model" not in checkpoint:
        raise ConfigError(f"{path} does not record its architecture (written before gptexp stored it)")
    spec = checkpoint["gptexp_model"]
    model_cls, config_cls = next(v for v in ARCHITECTURES.values() if v[0].__name__ == spec["class"])
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    if any("lora_" in k for k in state):
        raise ConfigError(f"{path} is a LoRA run: export its merged model instead (train with "
                          f"finetune.save_merged=true, then source=<run>/merged)")
    model = model_cls(config_cls(**spec["config"]))
    model.load_state_dict(state)
    return model


def load_gpt2(source: str) -> GPT2:
    path = Path(source).expanduser()
    if path.is_file() and path.suffix not in (".bin", ".ckpt"):
        raise ConfigError(f"source={source} is neither an llm.c model (.bin) nor a training checkpoint (.ckpt); "
                          f"pass one of those, a run directory, an HF GPT-2 directory or a hub id")
    if path.suffix == ".bin" and path.is_file():
        model = read_model(path)
    elif path.suffix == ".ckpt" or (path.is_dir() and not (path / "config.json").exists()):
        model = load_checkpoint(resolve_ckpt_path(str(path)))
    else:
        model = GPT2.from_pretrained(source)
    if not isinstance(model, GPT2):
        raise ConfigError(f"source={source} holds a {type(model).__name__}; only GPT-2 exports to these formats")
    return model.float().eval()


def export(cfg: DictConfig) -> None:
    if cfg.format not in ("llmc", "hf"):
        raise ConfigError(f"format={cfg.format!r}: choose llmc or hf")
    model = load_gpt2(str(cfg.source))
    if cfg.format == "hf":
        with writing(cfg.output):
            model.save_pretrained(cfg.output)
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


@hydra.main(version_base="1.3", config_path=f"{CONF_DIR}/tools", config_name="export")
def main(cfg: DictConfig) -> None:
    with answered_errors():
        export(cfg)


if __name__ == "__main__":
    run_command(main)
