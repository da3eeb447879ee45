"""Writing a run's files: a write that fails (a full disk, a read-only or vanished directory, an I/O
error) becomes one WriteError naming the file and the cause, whichever library was writing."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from gptexp.core.config import BadInput

RUST_IO_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust's std::io::Error ends its text


class WriteError(OSError):
    """A file of the run could not be written; str() names the file and the cause."""

    def __init__(self, path: str | os.PathLike, cause: OSError):
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.path, self.cause = Path(path), cause

    def __str__(self) -> str:
        if self.cause.errno == errno.ENOENT and not self.path.parent.is_dir():
            reason = f"its directory {self.path.parent} does not exist"
        else:
            reason = self.cause.strerror or str(self.cause)
        return f"cannot write {self.path}: {reason}"


def os_error_in(error: BaseException) -> OSError | None:
    """The OSError in `error`'s chain: torch.save reports a failed write as a RuntimeError raised while the file
    object's OSError was being handled, Lightning's TensorBoard logger as a ValueError, and a library written in Rust
    (safetensors) as an error of its own whose text ends in Rust's `(os error <errno>)`."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        if found := RUST_IO_ERROR.search(str(error)):
            return OSError(int(found[1]), os.strerror(int(found[1])))
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write inside the block into a WriteError for `path` (bad input stays what it is)."""
    try:
        yield
    except (WriteError, BadInput):
        raise
    except Exception as error:
        cause = os_error_in(error)
        if cause is None:
            raise
        raise WriteError(path, cause) from error


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write, renamed over `path` when the block ends: a reader (or
    a crash) sees the old file or the new one, never half of one. A failed write raises WriteError naming `path`;
    the temporary file is removed, and a removal that fails too (a read-only disk) never hides that error."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with writing(path):
        try:
            yield tmp
            os.replace(tmp, path)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Write a file by `write(f)`, flushed to disk, in place of `path` (`replacing`)."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def replace_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` by a file holding `data`, atomically (write_atomically)."""
    write_atomically(path, lambda f: f.write(data))
