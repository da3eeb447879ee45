"""Checkpoints that survive crashes: each is written to a temporary file beside its target and renamed
into place, so a process killed mid-write leaves the previous checkpoint whole; a truncated or corrupt
file is reported as such, naming the file and what to do."""

from __future__ import annotations

import os
import pickle
import zipfile
from contextlib import suppress
from pathlib import Path

import torch
from lightning.fabric.plugins import TorchCheckpointIO


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file, the problem and the fix."""


def save_atomically(checkpoint: dict, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the target's directory, flushed to disk, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # permissions as the umask says
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_readable(path: str | os.PathLike) -> None:
    """Fail fast on a truncated or non-checkpoint file: torch's zip archive must have its central
    directory, which is written last."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"{path} is truncated or not a checkpoint ({error}); resume from an earlier "
                              f"checkpoint (checkpoints/best.ckpt beside it) or leave ckpt_path unset") from error


def load(path: str | os.PathLike, map_location="cpu", mmap: bool = False) -> dict:
    """A checkpoint written by gptexp (trusted: it holds pickled training state, not just tensors)."""
    check_readable(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{path} is corrupt ({error}); resume from an earlier checkpoint "
                              f"(checkpoints/best.ckpt beside it) or leave ckpt_path unset") from error


def check_compatible(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: str) -> None:
    """The checkpoint's model tensors must be the model's: name the first that differs."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if not (missing or unexpected or mismatched):
        return
    if mismatched:
        k = mismatched[0]
        problem = f"tensor {k} has shape {tuple(state[k].shape)}, the model's is {tuple(expected[k].shape)}"
    elif missing:
        problem = f"tensor {missing[0]} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    else:
        problem = f"tensor {unexpected[0]} is not in the model" + (
            f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
    raise CheckpointError(f"{path} holds another architecture: {problem}; resume with the model.* and finetune "
                          f"settings of the run that wrote it (its .hydra/config.yaml)")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic, with clear errors for unusable files."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        save_atomically(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return load(path, map_location=map_location or "cpu")
