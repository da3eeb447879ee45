"""Architectures: plain nn.Modules, free of Lightning, data and files (gptexp.weights reads and writes them)."""

from gptexp.models.base import LanguageModel
from gptexp.models.gpt2 import GPT2, GPT2Config
from gptexp.models.llama import Llama, LlamaConfig

# arch name in conf/model/*.yaml -> (model class, its config dataclass)
ARCHITECTURES: dict[str, tuple[type[LanguageModel], type]] = {
    "gpt2": (GPT2, GPT2Config),
    "llama": (Llama, LlamaConfig),
}

__all__ = ["ARCHITECTURES", "GPT2", "GPT2Config", "LanguageModel", "Llama", "LlamaConfig"]
