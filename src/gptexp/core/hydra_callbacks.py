"""Hydra callbacks: what must happen before Hydra writes into the run directory."""

from __future__ import annotations

import atexit
import logging
import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from gptexp.core.run_lock import DirectoryInUse, RunLock, secondary_rank

log = logging.getLogger(__name__)
NEW_DIRECTORIES: list[Path] = []  # the run directory and the parents of it this run is about to make, deepest first


def unwritable_reason(directory: Path) -> str | None:
    """Why `directory` cannot be made and written, or None if it can."""
    existing = directory.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def stop(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class RunDirectory(Callback):
    """Stops with a one-line message when the run (or sweep) directory cannot be made; with `lock`, holds
    the run directory's lock (gptexp.core.run_lock) from before Hydra writes into it until the run ends, and
    stops with a line naming the holder when another live run has it. A multirun locks each job's
    directory for that job; the other ranks of a distributed run do not lock."""

    def __init__(self, lock: bool = False):
        self.lock_runs = lock
        self.lock: RunLock | None = None
        self.took_over: str | None = None
        if lock:
            atexit.register(self._release)  # also when the run ends by sys.exit, which skips on_run_end

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        directory = Path(config.hydra.run.dir).absolute()
        self._check(str(directory), "hydra.run.dir")
        NEW_DIRECTORIES[:] = [d for d in (directory, *directory.parents) if not d.exists()]
        self._lock(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            self._lock(config.hydra.runtime.output_dir)
        if self.took_over:  # said once Hydra's logging goes to the run's log file too
            log.warning(self.took_over)
            self.took_over = None

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            self._release()

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        self._release()

    @staticmethod
    def _check(directory: str, key: str) -> None:
        reason = unwritable_reason(Path(directory))
        if reason:
            stop(f"cannot write the output directory {directory}: {reason}; choose another with {key}=<directory>")

    def _lock(self, directory: str) -> None:
        if not self.lock_runs or secondary_rank():
            return
        self.lock = RunLock(directory)
        try:
            self.took_over = self.lock.acquire()
        except DirectoryInUse as error:
            self.lock = None
            stop(str(error))

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
