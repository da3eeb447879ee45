"""TinyStories (Eldan & Li, 2023): short stories in simple English, separated by <|endoftext|>.

source=hub reads roneneldan/TinyStories' TinyStories-train.txt / -valid.txt from the Hugging Face
hub (about 1.9 GB, downloaded once with a progress bar); source=bundled reads the 2,316-story
sample shipped in gptexp/assets; source=auto takes the hub when it is reachable.
"""

from __future__ import annotations

import logging
import os
from importlib import resources

log = logging.getLogger(__name__)

HUB_REPO = "roneneldan/TinyStories"
HUB_FILES = {"train": "TinyStories-train.txt", "val": "TinyStories-valid.txt"}
SEPARATOR = "<|endoftext|>"


def stories(text: str) -> list[str]:
    return [story.strip() for story in text.split(SEPARATOR) if story.strip()]


def load_splits(val_fraction: float, source: str = "auto") -> dict[str, list[str]]:
    """Stories per split: the hub's own train/valid files, or the bundled sample with its last
    `val_fraction` of stories held out."""
    if source not in ("auto", "bundled", "hub"):
        raise ValueError(f"data.source must be auto, bundled or hub, got {source!r}")
    if source == "hub" or (source == "auto" and os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false")):
        try:
            return {split: stories(open(_download(name), encoding="utf-8").read()) for split, name in HUB_FILES.items()}
        except OSError as error:
            if source == "hub":
                raise FileNotFoundError(f"cannot fetch {HUB_REPO} from the hub ({error}); use data.source=bundled "
                                        f"for the bundled sample") from error
            log.warning("TinyStories: the hub is unreachable (%s); using the bundled 2,316-story sample", error)
    sample = stories((resources.files("gptexp.assets") / "tinystories_sample.txt").read_text(encoding="utf-8"))
    n_val = max(1, round(len(sample) * val_fraction))
    return {"train": sample[:-n_val], "val": sample[-n_val:]}


def _download(filename: str) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(HUB_REPO, filename, repo_type="dataset", etag_timeout=10)
