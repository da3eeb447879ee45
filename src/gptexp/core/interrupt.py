"""Ctrl-C before a command has started (torch, Lightning and plotnine take seconds to import): one line and exit
status 130, as once it runs (gptexp.commands.cli.run_command), instead of Python's traceback. Every entry point calls
`answer_while_starting()` in its first lines, before anything heavy is imported."""

from __future__ import annotations

import os
import sys

INTERRUPTED = 130  # the shell's status for a process ended by Ctrl-C (128 + SIGINT)
MESSAGE = "error: interrupted (Ctrl-C) while starting; nothing was written"


def answer_while_starting() -> None:
    """From here on, a Ctrl-C that nothing else catches ends the process with MESSAGE, exit status 130; any other
    uncaught error is printed as before."""
    printed = sys.excepthook

    def answer(kind, error, trace):
        if issubclass(kind, KeyboardInterrupt):
            print(MESSAGE, file=sys.stderr, flush=True)
            os._exit(INTERRUPTED)  # nothing was started that an orderly exit would have to finish
        printed(kind, error, trace)

    sys.excepthook = answer
