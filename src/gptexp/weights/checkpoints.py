"""Checkpoints that survive crashes: each is written to a temporary file beside its target and renamed
into place, so a process killed mid-write leaves the previous checkpoint whole; a truncated or corrupt
file is reported as such, naming the file and what to do. They hold tensors and plain data only, and are
read back without running code from them (gptexp.core.safe_load)."""

from __future__ import annotations

import os
import pickle
import zipfile
from contextlib import suppress
from pathlib import Path

import torch

from gptexp.core.config import BadInput
from gptexp.core.safe_load import UnsafeFileError, torch_load
from gptexp.core.writing import write_atomically, writing


class CheckpointError(BadInput, RuntimeError):
    """A checkpoint that cannot be used; the message names the file, the problem and the fix."""


def save_atomically(checkpoint: dict, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the target's directory, flushed to disk, then renamed over it.
    A failed write raises WriteError naming `path`; the file that was there stays whole."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(exist_ok=True)  # the checkpoints folder; a vanished run directory is not remade
    write_atomically(path, lambda f: torch.save(checkpoint, f))


RESUME_FIX = "resume from an earlier checkpoint (checkpoints/best.ckpt beside it) or leave ckpt_path unset"
READ_FIX = "use another checkpoint of the run (its best.ckpt or last.ckpt) or another model"  # reading a model


def check_readable(path: str | os.PathLike, fix: str = RESUME_FIX) -> None:
    """Fail fast on a truncated or non-checkpoint file: torch's zip archive must have its central
    directory, which is written last. `fix`: what the message advises (resuming, or reading a model)."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"{path} is truncated or not a checkpoint ({error}); {fix}") from error


def load(path: str | os.PathLike, map_location="cpu", mmap: bool = False, fix: str = RESUME_FIX) -> dict:
    """A checkpoint written by gptexp, unpickled weights-only: one that asks for any other type raises
    UnsafeFileError naming it (unless the command trusts it: gptexp.core.safe_load.trusting)."""
    check_readable(path, fix)
    try:
        return torch_load(path, map_location=map_location, mmap=mmap)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{path} is corrupt ({error}); {fix}") from error


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


def remove_partial_writes(directory: str | os.PathLike) -> int:
    """Delete the temporary files that killed writers left in `directory` (call it holding the run's
    lock: no live writer then); how many there were."""
    partial = list(Path(directory).glob(".*.ckpt.*.tmp"))
    for path in partial:
        with suppress(FileNotFoundError):
            path.unlink()
    return len(partial)


def saved_step(path: str | os.PathLike) -> int | None:
    """The optimizer steps a checkpoint file holds, or None if it does not load (or is refused)."""
    try:
        return int(load(path, mmap=True).get("global_step", 0))
    except (CheckpointError, UnsafeFileError, OSError):
        return None


def last_intact(directory: str | os.PathLike) -> tuple[int, Path] | None:
    """(step, path) of the furthest checkpoint in `directory` that loads, or None."""
    intact = [(step, path) for path in sorted(Path(directory).glob("*.ckpt"))
              if (step := saved_step(path)) is not None]
    return max(intact, key=lambda found: found[0]) if intact else None


def resolve_ckpt_path(ckpt_path: str | None) -> str | None:
    """A checkpoint file, or a run directory meaning its checkpoints/last.ckpt."""
    if ckpt_path is None:
        return None
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                check_readable(candidate)
                return str(candidate)
        raise FileNotFoundError(f"ckpt_path={ckpt_path} is a directory without checkpoints/last.ckpt; "
                                f"pass a run directory (outputs/<date>/<time>) or a .ckpt file")
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist; pass a .ckpt file or a run directory "
                                f"(outputs/<date>/<time>) holding checkpoints/last.ckpt")
    check_readable(path)
    return str(path)
