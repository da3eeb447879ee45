"""Where pretrained weights come from: a local directory or a Hugging Face hub id, and HF's weight files."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from gptexp.safe_load import torch_load

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # 'gpt2', 'meta-llama/Llama-2-7b-hf'
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def resolve_pretrained(name_or_path: str | os.PathLike, *, allow_patterns: list[str]) -> Path:
    """Return a local directory for `name_or_path`: an existing path, or a hub id fetched into HF's cache.

    Offline (HF_HUB_OFFLINE=1 or no network) a hub id that is not cached fails at once with a
    message saying how to get the files and that a local directory works.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if not HUB_ID.fullmatch(name):
        raise FileNotFoundError(f"checkpoint path '{name}' does not exist; pass an existing directory "
                                f"or a Hugging Face hub id such as 'gpt2'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    try:
        return Path(snapshot_download(name, allow_patterns=allow_patterns, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    offline_hint = (f"'{name}' is neither a local path nor in the Hugging Face cache, and the hub cannot be reached "
                    f"({'HF_HUB_OFFLINE is set' if _hub_offline() else 'no network'}). Either download it where "
                    f"there is network (`huggingface-cli download {name}`), or pass a local directory holding "
                    f"config.json and model.safetensors.")
    if _hub_offline():
        raise FileNotFoundError(offline_hint)
    try:
        return Path(snapshot_download(name, allow_patterns=allow_patterns, etag_timeout=10))
    except (LocalEntryNotFoundError, OSError) as error:
        raise FileNotFoundError(offline_hint) from error
    except HfHubHTTPError as error:
        raise FileNotFoundError(f"the hub refused '{name}': {error}. Gated models need `huggingface-cli login` "
                                f"with an account that accepted the license.") from error


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def load_hf_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Read every tensor of an HF checkpoint directory: single or sharded safetensors, else .bin."""
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
        return {k: v for shard in shards
                for k, v in torch_load(directory / shard).items()}
    raise FileNotFoundError(f"no weights in {directory}: expected one of {', '.join(WEIGHT_FILES)}")
