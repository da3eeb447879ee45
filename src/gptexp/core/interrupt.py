"""Ctrl-C before a command has started (torch, Lightning and plotnine take seconds to import): one line and exit
status 130, as once it runs (gptexp.commands.cli.run_command), instead of Python's traceback. Every entry point calls
`answer_while_starting()` in its first lines, before anything heavy is imported, and `started()` once it is ready
to stop its work in order (run_command does)."""

from __future__ import annotations

import os
import signal

INTERRUPTED = 130  # the shell's status for a process ended by Ctrl-C (128 + SIGINT)
MESSAGE = "error: interrupted (Ctrl-C) while starting; nothing was written"


def answer_while_starting() -> None:
    """Until `started()`, Ctrl-C ends the process at once with MESSAGE, exit status 130. Nothing is written yet, and a
    KeyboardInterrupt raised inside an import would do harm: a module left half made fails its next import another
    way (numpy: RecursionError), and one raised through C++ (torch's start-up) aborts the process."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where Ctrl-C is ignored (nohup, &)
        signal.signal(signal.SIGINT, _exit_at_once)


def started() -> None:
    """From here on Ctrl-C raises KeyboardInterrupt again, for the command to stop its work in order."""
    if signal.getsignal(signal.SIGINT) is _exit_at_once:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _exit_at_once(signum, frame) -> None:
    os.write(2, f"{MESSAGE}\n".encode())
    os._exit(INTERRUPTED)
