"""One run per directory: a run holds an exclusive lock on `<run dir>/.lock` for its lifetime.

The lock is the kernel's (flock): it goes when its process ends, however it ends, so a directory left
by a killed run, or by a preempted node once the file server notices, is taken over, with a line saying
so. The file records the holder (host, pid, start time, command) to name it to a run that is refused.
Only rank 0 of a distributed run locks: its other processes work in the same directory by design.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from contextlib import suppress
from pathlib import Path

import psutil

LOCK_FILE = ".lock"
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # file systems without flock


class DirectoryInUse(RuntimeError):
    """Another live run holds the directory; the message names it and the way out."""


def secondary_rank() -> bool:
    """Whether this process is a non-zero rank of a distributed run: Lightning's DDP launcher, torchrun and
    SLURM say so in the environment."""
    return any(os.environ.get(key, "0") not in ("", "0") for key in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"))


def this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time(),
            "command": " ".join(sys.argv)}


def describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')} (started {started}: {holder.get('command', '?')})"


def alive(holder: dict) -> bool:
    """Whether the recorded holder still runs, as far as this host can tell (another host's: assumed)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        return abs(psutil.Process(holder["pid"]).create_time() - holder.get("started", 0)) < 1
    except (psutil.Error, KeyError, TypeError):
        return False


class RunLock:
    """The lock of one run directory: acquire() takes it or raises DirectoryInUse; release() gives it back."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; a line to log when it was taken over from a run that died holding it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self.holder(fd)
                os.close(fd)
                raise DirectoryInUse(self.refusal(holder)) from None
            except OSError as error:
                if error.errno not in NO_LOCKS:
                    os.close(fd)
                    raise
                holder = self.holder(fd)  # no kernel locks here: trust the record of a live holder
                if holder and alive(holder):
                    os.close(fd)
                    raise DirectoryInUse(self.refusal(holder)) from None
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # the holder removed the file as we opened it: lock the new one
        previous, self.fd = self.holder(fd), fd
        me = this_process()
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        if previous and (previous.get("host"), previous.get("pid")) != (me["host"], me["pid"]):
            return (f"took over {self.directory} from {describe(previous)}, which ended without releasing it "
                    f"(killed, or its node lost)")
        return None

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError:  # a directory turned read-only: an empty record says the lock was released
            with suppress(OSError):
                os.ftruncate(self.fd, 0)
        os.close(self.fd)
        self.fd = None

    def refusal(self, holder: dict) -> str:
        who = describe(holder) if holder else "another process"
        way_out = ("wait for it to end or stop it, or give this run a directory of its own with "
                   "hydra.run.dir=<directory>")
        if holder and holder.get("host") != socket.gethostname():
            way_out += f"; if that run is gone (a lost node), delete {self.path}"
        return f"{self.directory} is in use by another run, {who}; {way_out}"

    @staticmethod
    def holder(fd: int) -> dict:
        try:
            data = os.pread(fd, 65536, 0)
            return json.loads(data) if data.strip() else {}
        except (OSError, ValueError):
            return {}
