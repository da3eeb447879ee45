"""Any model gptexp reads, with its tokenizer: what `source=` means for the commands that use a model.

A source is a run directory (its best checkpoint, or the last), a training checkpoint (.ckpt), a Hugging
Face directory or hub id (GPT-2 or LLaMA), a Meta LLaMA directory, a llama2.c .bin, an llm.c model .bin, a
quantized .safetensors (export format=quantized) or a llama.cpp .gguf file (GPT-2 or LLaMA, dequantized).
The architecture comes from the source itself; so does the tokenizer: a checkpoint records its own (a
character-level run's characters travel with it), checkpoints written before that take it from the run's
saved config, and the other formats bring theirs (GPT-2's BPE, a LLaMA's tokenizer.model). A LoRA run's
adapter is folded into the base weights. Pickled files (checkpoints, Meta .pth, pytorch_model.bin) are read
without running code from them (gptexp.safe_load).
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from gptexp.checkpoints import load
from gptexp.config import ConfigError
from gptexp.data.tokenizers import gpt2_tokenizer, load_tokenizer, tokenizer_from_state, tokenizer_state
from gptexp.models import ARCHITECTURES, GPT2, LanguageModel, Llama
from gptexp.models import quantize as quantization
from gptexp.models import nf4
from gptexp.models.llmc import MODEL_MAGIC, read_model
from gptexp.models.pretrained import read_json, resolve_pretrained
from gptexp.safe_load import UnsafeFileError, trusting
from gptexp.writing import write_atomically

FORMATS = ("a run directory (checkpoints/best.ckpt or last.ckpt)", "a .ckpt file",
           "a quantized .safetensors (export format=quantized)", "a .gguf file (llama.cpp's; gpt2 or llama)",
           "a Hugging Face directory (config.json) or hub id", "a Meta directory (params.json)",
           "a llama2.c .bin", "an llm.c model .bin")


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
QUANTIZED_FORMAT = "gptexp-quantized"  # the safetensors metadata's "format" of a saved quantized model
TOKENIZER_TENSOR = "gptexp.tokenizer_model"  # a SentencePiece model's bytes, in a quantized file


@dataclass
class Source:
    model: LanguageModel
    tokenizer: Any
    description: str  # what was loaded, for the log
    template: str | None = None  # the template an instruction run was trained in (gptexp.finetune.templates)

    def place(self, device: str = "auto", precision: str = "fp32", quantize: str | None = None,
              group_size: int = quantization.DEFAULT_GROUP_SIZE) -> str:
        """Move the model to `device` (auto | cpu | cuda) in `precision` (fp32 | bf16: the weights, or with
        `quantize` the activations and what stays unquantized), its linear layers quantized to `quantize` (int8 |
        int4, groups of `group_size`: gptexp.models.quantize; nf4 but the head: gptexp.models.nf4) where they are
        not already; returns the device's name. Bad values raise ConfigError naming the choices."""
        if precision not in PRECISIONS:
            raise ConfigError(f"precision={precision!r}: choose fp32 or bf16")
        if device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device={device!r}: choose auto, cpu or cuda")
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device=cuda, but torch sees no CUDA device here; use device=cpu (or auto)")
        quantization.check(quantize, group_size, quantization.LOADING_SCHEMES)
        held = getattr(self.model, "quantization", None)
        if held and quantize and quantize != held["scheme"]:
            raise ConfigError(f"quantize={quantize}: the source is already quantized to {held['scheme']}; leave "
                              f"quantize unset to use it as it is, or quantize the unquantized model")
        name = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
        self.model = self.model.to(device=name, dtype=PRECISIONS[precision]).eval()
        if quantize == "nf4" and not held:
            nf4.quantize(self.model, name, "quantize=nf4")
        elif quantize and not held:
            quantization.quantize(self.model, quantize, group_size)
        return name

    def save_quantized(self, path: str | Path) -> None:
        """Write the quantized model, its tokenizer and template to one safetensors file that `load_source` reads
        again as it is (no quantizing)."""
        from safetensors.torch import save

        held = getattr(self.model, "quantization", None)
        if not held:
            raise ConfigError("the model is not quantized: place it with quantize=int8 or int4 first")
        tokenizer = tokenizer_state(self.tokenizer)
        tensors = {k: v.contiguous().cpu() for k, v in self.model.state_dict().items()}
        if "model" in tokenizer:  # SentencePiece's bytes travel as a tensor
            tensors[TOKENIZER_TENSOR] = torch.frombuffer(bytearray(tokenizer.pop("model")), dtype=torch.uint8)
        spec = {"class": type(self.model).__name__, "config": asdict(self.model.config)}
        metadata = {"format": QUANTIZED_FORMAT, "model": json.dumps(spec), "quantization": json.dumps(held),
                    "tokenizer": json.dumps(tokenizer), "template": json.dumps(self.template),
                    "description": self.description}
        data = save(tensors, metadata=metadata)
        write_atomically(Path(path), lambda f: f.write(data))


def load_source(source: str, checkpoint: str = "best", trust: bool = False, key: str = "source") -> Source:
    """The model and tokenizer `source` names (see the module docstring); `checkpoint` picks a run
    directory's best or last checkpoint. Raises ConfigError naming what was looked for (as `key`=source: the
    option that named it), and UnsafeFileError for a pickled file that asks for more than tensors and plain
    data, unless `trust` (trust_checkpoint=true)."""
    if checkpoint not in ("best", "last"):
        raise ConfigError(f"checkpoint={checkpoint!r}: choose best or last")
    try:
        with trusting(trust):
            return _load(str(source), checkpoint, key)
    except (ConfigError, UnsafeFileError):
        raise
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"{key}={source}: {error}") from error


def _load(source: str, checkpoint: str, key: str) -> Source:
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "checkpoints").is_dir():
            return _from_run(path, checkpoint)
        if (path / "params.json").is_file() or (path / "config.json").is_file():
            return _from_pretrained_directory(path)
    elif path.is_file():
        if path.suffix == ".ckpt":
            return _from_checkpoint(path)
        if path.suffix == ".bin":
            return _from_bin(path)
        if path.suffix == ".safetensors":
            return _from_quantized(path)
        if path.suffix == ".gguf":
            return _from_gguf(path)
    elif not path.is_absolute() and not source.startswith((".", "~")) and source.count("/") <= 1:
        return _from_hub(source)
    what = "does not exist" if not path.exists() else "is none of the formats"
    raise ConfigError(f"{key}={source} {what}; pass {', '.join(FORMATS[:-1])} or {FORMATS[-1]}")


def _from_run(run: Path, checkpoint: str) -> Source:
    path = run / "checkpoints" / f"{checkpoint}.ckpt"
    if not path.is_file() and checkpoint == "best" and (run / "checkpoints" / "last.ckpt").is_file():
        path = run / "checkpoints" / "last.ckpt"  # a run that never validated keeps only its last step
    if not path.is_file():
        raise ConfigError(f"{run}/checkpoints holds no {checkpoint}.ckpt; pass checkpoint=last or another run")
    return _from_checkpoint(path)


def _from_checkpoint(path: Path) -> Source:
    state = load(path)
    if "gptexp_model" not in state:
        raise ConfigError(f"{path} does not record its architecture (written before gptexp stored it)")
    spec = state["gptexp_model"]
    model_cls, config_cls = next(v for v in ARCHITECTURES.values() if v[0].__name__ == spec["class"])
    model = model_cls(config_cls(**spec["config"]))
    weights = {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
    if nf4.is_quantized_state(weights):  # a QLoRA run: its NF4 base, dequantized (the adapter is merged below)
        weights = nf4.dequantized(weights, f"reading {path}, a QLoRA run's checkpoint,")
    if any("lora_" in k for k in weights):
        model = _with_adapter(model, weights, state.get("gptexp_lora") or _run_lora(path), path)
    else:
        model.load_state_dict(weights)
    if "gptexp_tokenizer" in state:
        tokenizer = tokenizer_from_state(state["gptexp_tokenizer"])
    else:
        tokenizer = _run_tokenizer(path)
    return Source(model.eval(), tokenizer, f"{path} (step {state.get('global_step', '?')})",
                  state.get("gptexp_template"))


def _with_adapter(model: LanguageModel, weights: dict, lora: dict, path: Path) -> LanguageModel:
    """The base model with the checkpoint's LoRA adapter folded into its weights."""
    from gptexp import finetune

    wrapped = finetune.apply(model, {"method": "lora", "r": lora["r"], "alpha": lora["alpha"], "dropout": 0.0,
                                     "target_modules": list(lora["target_modules"])})
    try:
        wrapped.load_state_dict(weights)
    except RuntimeError as error:
        raise ConfigError(f"{path}: its LoRA weights do not fit the adapter it records: {error}") from error
    return wrapped.merge_and_unload()


def _run_config(path: Path):
    config = path.parent.parent / ".hydra" / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"{path} records no tokenizer and has no run config ({config}) to take it from")
    return OmegaConf.load(config)


def _run_lora(path: Path) -> dict:
    finetune = _run_config(path).finetune
    return {"r": finetune.r, "alpha": finetune.alpha, "target_modules": finetune.target_modules or ["c_attn"]}


def _run_tokenizer(path: Path):
    """The tokenizer a checkpoint written before checkpoints recorded theirs was trained with."""
    from gptexp import data, models

    cfg = _run_config(path)
    spec = "char" if cfg.data.get("tokenizer") == "char" else models.tokenizer_spec(cfg.model)
    return data.load(cfg.data, spec).tokenizer


def _from_pretrained_directory(directory: Path) -> Source:
    if (directory / "params.json").is_file():
        return Source(Llama.from_pretrained(directory), load_tokenizer(Llama.tokenizer_for(str(directory))),
                      f"Meta LLaMA {directory}")
    model_type = read_json(directory / "config.json").get("model_type")
    if model_type == "gpt2":
        return Source(GPT2.from_pretrained(directory), gpt2_tokenizer(), f"HF GPT-2 {directory}")
    if model_type == "llama":
        return Source(Llama.from_pretrained(directory), load_tokenizer(Llama.tokenizer_for(str(directory))),
                      f"HF LLaMA {directory}")
    raise ConfigError(f"{directory}/config.json has model_type {model_type!r}; gptexp reads gpt2 and llama")


def _from_quantized(path: Path) -> Source:
    """A model `Source.save_quantized` wrote: its quantized values loaded as they are."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except SafetensorError as error:
        raise ConfigError(f"{path} is not a readable safetensors file ({error}); export format=quantized writes "
                          f"one gptexp reads") from None
    if metadata.get("format") != QUANTIZED_FORMAT:
        raise ConfigError(f"{path} is not a quantized gptexp model (export format=quantized writes one); for an HF "
                          f"model pass its directory")
    spec, held = json.loads(metadata["model"]), json.loads(metadata["quantization"])
    model_cls, config_cls = next(v for v in ARCHITECTURES.values() if v[0].__name__ == spec["class"])
    with torch.device("meta"):
        model = model_cls(config_cls(**spec["config"]))
        quantization.replace_layers(model, held["scheme"], held["group_size"] or quantization.DEFAULT_GROUP_SIZE)
    tensors = load_file(str(path))
    tokenizer = json.loads(metadata["tokenizer"])
    if TOKENIZER_TENSOR in tensors:
        tokenizer["model"] = tensors.pop(TOKENIZER_TENSOR).numpy().tobytes()
    model.load_state_dict(tensors, strict=True, assign=True)
    model.rebuild_buffers()
    for module in model.modules():
        if isinstance(module, quantization.QuantizedLinear):
            module.pack()
    return Source(model.eval(), tokenizer_from_state(tokenizer), f"{metadata['description']}, {held['scheme']} ({path})",
                  json.loads(metadata["template"]))


def _from_bin(path: Path) -> Source:
    with open(path, "rb") as f:
        head = f.read(4)
    if len(head) == 4 and struct.unpack("<i", head)[0] == MODEL_MAGIC:
        return Source(read_model(path), gpt2_tokenizer(), f"llm.c model {path}")
    try:
        model = Llama.from_pretrained(path)
        tokenizer = load_tokenizer(Llama.tokenizer_for(str(path)))
    except (ValueError, FileNotFoundError) as error:
        raise ValueError(f"neither an llm.c model file (magic {MODEL_MAGIC}) nor a llama2.c legacy export: "
                         f"{error}") from error
    return Source(model, tokenizer, f"llama2.c {path}")


def _from_gguf(path: Path) -> Source:
    """llama.cpp's file (export format=gguf writes one): its GPT-2 or LLaMA dequantized, its tokenizer from the file."""
    from gptexp.models.gguf_files import read_gguf

    model, tokenizer = read_gguf(path)
    return Source(model, tokenizer, f"GGUF {path}")


def _from_hub(name: str) -> Source:
    try:
        directory = resolve_pretrained(name, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"])
    except FileNotFoundError as error:
        raise FileNotFoundError(f"not a local path, so it was taken for a hub id: {error}") from error
    return _from_pretrained_directory(directory)
