"""Any local UTF-8 text file (data=text data.path=<file>): split by characters like Tiny Shakespeare."""

from __future__ import annotations

from pathlib import Path

from gptexp.core.config import ConfigError


def load_splits(val_fraction: float, source: str = "auto", path: str | None = None) -> dict[str, list[str]]:
    """The file's text: the first 1 - val_fraction trains, the rest validates."""
    if path is None:
        raise ValueError("data=text reads a local file: set data.path=<a UTF-8 text file>")
    file = Path(path).expanduser()
    if not file.exists():
        raise ValueError(f"data.path={path} does not exist; give the path of a UTF-8 text file")
    if not file.is_file():
        raise ValueError(f"data.path={path} is a directory, not a file; give the path of a UTF-8 text file")
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"data.path={path} is not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}); "
                         f"convert it first, e.g. iconv -f latin1 -t utf-8 {path} > {file.stem}.utf8.txt") from error
    if not text.strip():
        raise ValueError(f"data.path={path} is empty; give a file with text to train on")
    n_train = int(len(text) * (1 - val_fraction))
    return {"train": [text[:n_train]], "val": [text[n_train:]]}


def read_utf8(path: Path) -> str:
    """The text of a file that must be UTF-8 (records, prompts); ConfigError naming the line where it is not."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise ConfigError(f"{path}, line {line}: not UTF-8 text (byte 0x{raw[error.start]:02x} at offset "
                          f"{error.start}); save it as UTF-8, e.g. iconv -f latin1 -t utf-8 {path} > "
                          f"{path.stem}.utf8{path.suffix}") from None
