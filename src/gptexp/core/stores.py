"""SQLite files that a library keeps its store in (MLflow's runs, Optuna's studies), checked before the library
opens them: on a file it cannot use, MLflow retries for minutes and Optuna stops with SQLAlchemy's traceback."""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path

from gptexp.core.hydra_callbacks import unwritable_reason


def sqlite_path(url: str) -> Path | None:
    """The file of a `sqlite:///<path>` URL (a relative path: from the working directory), or None for another URL."""
    return Path(url.removeprefix("sqlite:///")).expanduser() if url.startswith("sqlite:///") else None


def sqlite_problem(path: Path) -> str | None:
    """Why `path` cannot hold a SQLite store to read and write, or None if it can: no file yet, in a directory that
    can be made and written, or a writable SQLite database. Opens the file read-only; changes nothing."""
    if path.is_dir():
        return f"{path} is a directory"
    reason = unwritable_reason(path.parent)  # SQLite also writes a journal beside the file
    if reason or not path.exists():
        return reason
    if not os.access(path, os.W_OK):
        return f"{path} is not writable"
    try:
        with closing(sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)) as db:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as error:
        return f"{path} is not a SQLite database ({error})"
    return None
