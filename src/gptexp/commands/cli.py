"""What every command does when something goes wrong, so that each answers alike:

- bad input (an unknown option or key, a wrong value, a missing or unreadable file, a busy directory)
  gets one line on stderr and exit status 2, and a run directory the command made is removed (unless it already
  holds a checkpoint: bad input that only training meets, such as a faulty reward, leaves what was saved);
- a fault during the work (a write that fails, ...) gets one line naming what failed, exit status 1, and
  everything written so far stays;
- anything else is a bug and keeps its traceback. HYDRA_FULL_ERROR=1 shows tracebacks for all.

A command's Hydra task runs its work inside `answered_errors()`, and its `__main__` calls
`run_command(main)`, which answers Hydra's own errors (composition, overrides) the same way.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from gptexp.core.config import BadInput
from gptexp.core.hydra_callbacks import NEW_DIRECTORIES
from gptexp.core.interrupt import started
from gptexp.core.writing import WriteError

BAD_INPUT = (BadInput, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, HydraException,
             OmegaConfBaseException)
HYDRA_OWN = {".hydra", ".lock"}  # with *.log: what Hydra (and the run lock) put in a run directory first
OUR_FULL_ERROR = "GPTEXP_SET_HYDRA_FULL_ERROR"  # marks a HYDRA_FULL_ERROR=1 set by run_command(), not the user


class Fault(Exception):
    """The work failed for a reason other than its input (a full disk, ...); the message names it."""


def one_line(error: BaseException) -> str:
    """An error's message on one line: Hydra's lists of options joined with commas, its search path and
    OmegaConf's full_key / object_type notes left out, the cause's first line added when it says more."""
    if isinstance(error, MissingMandatoryValue):
        key = error.full_key or "a key"
        return f"{key} is required: add {key}=<value> to the command"
    text = str(error).split("Config search path:")[0]
    cause = error.__cause__
    if isinstance(cause, (HydraException, OmegaConfBaseException)):
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        if first and first not in text:
            text += "\n" + first
    segments: list[tuple[str, list[str] | None]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("full_key:", "object_type=", "reference_type=")):
            continue
        if raw[:1].isspace() and segments and segments[-1][1] is not None:
            segments[-1][1].append(line)
        else:
            segments.append((line, [] if line.endswith(":") else None))
    return "; ".join(head + (" " + ", ".join(items) if items else "") for head, items in segments)


def fail(message: str, status: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def made_by_this_run(directory: Path) -> bool:
    """Whether `directory` holds nothing but what Hydra writes first (a directory this run made)."""
    return directory.is_dir() and all(p.name in HYDRA_OWN or p.suffix == ".log" for p in directory.iterdir())


def remove_run_directory(directory: Path) -> None:
    """Remove a run directory this run made, and the parents Hydra made for it (outputs/<date>) if empty."""
    shutil.rmtree(directory, ignore_errors=True)
    for parent in NEW_DIRECTORIES:
        if parent != directory.absolute() and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()


@contextmanager
def answered_errors(output_dir: str | os.PathLike | None = None) -> Iterator[None]:
    """Answer bad input and faults raised inside the block as this module says. `output_dir`: the run
    directory Hydra made for this command, removed on bad input if nothing else was written to it yet
    (None for commands that write where they are told)."""
    directory = Path(output_dir) if output_dir else None
    removable = directory is not None and made_by_this_run(directory)
    logging.raiseExceptions = False  # a log file on a full disk must not print tracebacks over the one line
    try:
        yield
    except (Fault, WriteError) as error:
        fail(str(error), 1)
    except BAD_INPUT as error:
        if removable and not any(directory.rglob("*.ckpt")):  # bad input found mid-run (a reward) keeps its checkpoints
            remove_run_directory(directory)
        fail(one_line(error), 2)


def run_command(app: Callable[[], object]) -> None:
    """Call a @hydra.main app with Hydra's own errors (an unknown option, a bad override) answered in one
    line with exit status 2, instead of Hydra's several lines and status 1, and so bad input found outside the task
    (by a sweeper, before its jobs), and Ctrl-C in one line too."""
    started()  # Ctrl-C raises KeyboardInterrupt again (gptexp.core.interrupt)
    if os.environ.get("HYDRA_FULL_ERROR") and not os.environ.get(OUR_FULL_ERROR):
        app()  # the user asked for full tracebacks
        return
    os.environ["HYDRA_FULL_ERROR"] = os.environ[OUR_FULL_ERROR] = "1"  # Hydra then raises instead of printing
    try:
        app()
    except (BadInput, HydraException, OmegaConfBaseException) as error:
        fail(one_line(error), 2)
    except KeyboardInterrupt:  # Ctrl-C outside the Trainer (which stops itself cleanly): one line, the shell's 130
        fail("interrupted (Ctrl-C); what was written before stays, nothing is half-written", 130)
