"""Tiny Shakespeare (karpathy/char-rnn, 1,115,394 characters), bundled with gptexp."""

from __future__ import annotations

from importlib import resources


def load_splits(val_fraction: float, source: str = "bundled") -> dict[str, list[str]]:
    """The text split by characters, as nanoGPT does: the first 1 - val_fraction trains, the rest validates."""
    if source not in ("auto", "bundled"):
        raise ValueError(f"data.source={source!r}: Tiny Shakespeare is bundled only; use data.source=bundled")
    text = (resources.files("gptexp.assets") / "tinyshakespeare.txt").read_text(encoding="utf-8")
    n_train = int(len(text) * (1 - val_fraction))
    return {"train": [text[:n_train]], "val": [text[n_train:]]}
