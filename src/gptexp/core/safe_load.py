"""Reading PyTorch's pickled files (training checkpoints, Meta .pth, pytorch_model.bin) without running code
from them. Every such read in gptexp goes through `torch_load`: torch's weights-only unpickler, which builds
tensors and plain containers and refuses any other type before calling anything. A file that asks for
another type is refused with UnsafeFileError naming it, unless the command was run with
trust_checkpoint=true (`trusting`), which unpickles that file in full."""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
import torch

from gptexp.core.config import BadInput, ConfigError

log = logging.getLogger(__name__)

TRUST_OPTION = "trust_checkpoint=true"
_trusted: ContextVar[bool] = ContextVar("trust_checkpoint", default=False)

# gptexp checkpoints written before 2026-12-04 hold NumPy's RNG state as a uint32 array (now a tensor): the
# array's own types, by name, under both NumPy 2's module path and NumPy 1's. None of them calls anything else.
LEGACY_NUMPY = [np._core.multiarray._reconstruct, (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
                np.ndarray, np.dtype, np.dtypes.UInt32DType]


class UnsafeFileError(BadInput, ValueError):
    """A file asks the unpickler for a type that is not a tensor or plain data: loading it could run code."""


@contextmanager
def trusting(trusted: bool) -> Iterator[None]:
    """Within the block, files that need full unpickling are loaded (trusted=True) instead of refused: the
    command line's trust_checkpoint=true. Anything but a boolean raises ConfigError."""
    if not isinstance(trusted, bool):
        raise ConfigError(f"trust_checkpoint must be true or false, got {trusted!r}")
    token = _trusted.set(trusted)
    try:
        yield
    finally:
        _trusted.reset(token)


def torch_load(path: str | os.PathLike, map_location="cpu", mmap: bool = False):
    """torch.load(path) with weights_only=True (plus the legacy NumPy types above). A file that asks for
    anything else raises UnsafeFileError naming the file and the type, before anything of it runs, unless
    `trusting(True)` is in effect; other failures (a corrupt file) raise what torch.load raises."""
    try:
        with torch.serialization.safe_globals(LEGACY_NUMPY):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        asked = _asked_for(path, str(error))
        if asked is None:
            raise
        if not _trusted.get():
            raise UnsafeFileError(
                f"{path} asks to unpickle {asked}: not tensors or plain data, so loading it could run code; "
                f"if you trust where the file came from, load it with {TRUST_OPTION}") from None
    log.warning("%s is unpickled in full (%s): it asks for %s", path, TRUST_OPTION, asked)
    return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)


def _asked_for(path: str | os.PathLike, message: str) -> str | None:
    """The types a file's pickle asks for beyond those allowed, or None when the failure was something else.
    The pickle's GLOBALs are read without running it; a type made some other way is named by torch's message."""
    try:
        with torch.serialization.safe_globals(LEGACY_NUMPY):
            names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except (ValueError, RuntimeError, OSError):  # not a zip checkpoint (torch's legacy format), or unreadable
        names = []
    if not names:
        names = re.findall(r"GLOBAL ([\w.]+)|but got <class '([^']+)'>", message)
        names = [global_ or built for global_, built in names]
    return ", ".join(names) if names else None
