"""The Hugging Face hub: a model id fetched into HF's cache (or found there), with a clear answer offline."""

from __future__ import annotations

import os
import re
from pathlib import Path

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # 'gpt2', 'meta-llama/Llama-2-7b-hf'
FILES = ["*.json", "*.safetensors", "tokenizer.model"]  # what a model's directory needs: config, weights, tokenizer


def is_hub_id(spec: str) -> bool:
    """Whether `spec`, not a local path, can name a hub repository (not absolute, not ./ or ~/, one slash at most)."""
    return not spec.startswith(("/", ".", "~")) and HUB_ID.fullmatch(spec) is not None


def snapshot(name: str) -> Path:
    """The local directory of hub model `name`: HF's cached copy, else downloaded into the cache.

    Offline (HF_HUB_OFFLINE=1 or no network) a model that is not cached fails at once with FileNotFoundError
    saying how to get the files and that a local directory works."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, allow_patterns=FILES, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    hint = (f"'{name}' is neither a local path nor in the Hugging Face cache, and the hub cannot be reached "
            f"({'HF_HUB_OFFLINE is set' if offline else 'no network'}). Either download it where there is network "
            f"(`huggingface-cli download {name}`), or pass a local directory holding config.json and "
            f"model.safetensors.")
    if offline:
        raise FileNotFoundError(hint)
    try:
        return Path(snapshot_download(name, allow_patterns=FILES, etag_timeout=10))
    except (LocalEntryNotFoundError, OSError) as error:
        raise FileNotFoundError(hint) from error
    except HfHubHTTPError as error:
        raise FileNotFoundError(f"the hub refused '{name}': {error}. Gated models need `huggingface-cli login` "
                                f"with an account that accepted the license.") from error
