"""Ctrl-C before a command has started (torch, Lightning and plotnine take seconds to import): one line and exit
status 130, as once it runs (gptexp.commands.cli.run_command), instead of Python's traceback. Every entry point calls
`answer_while_starting()` in its first lines, before anything heavy is imported."""

from __future__ import annotations

import os
import signal
import sys

INTERRUPTED = 130  # the shell's status for a process ended by Ctrl-C (128 + SIGINT)
MESSAGE = "error: interrupted (Ctrl-C) while starting; nothing was written"


def answer_while_starting() -> None:
    """From here on, a process that ends on an uncaught error after a Ctrl-C ends with MESSAGE, exit status 130.
    The error need not be the KeyboardInterrupt itself: one raised inside an import can leave a module half made, and
    the next import of it fail another way (numpy: a RecursionError). Any other uncaught error is printed as before."""
    pressed = []

    def interrupt(signum, frame):
        pressed.append(signum)
        raise KeyboardInterrupt

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where Ctrl-C is ignored (nohup, &)
        signal.signal(signal.SIGINT, interrupt)
    printed = sys.excepthook

    def answer(kind, error, trace):
        if pressed or issubclass(kind, KeyboardInterrupt):
            print(MESSAGE, file=sys.stderr, flush=True)
            os._exit(INTERRUPTED)  # nothing was started that an orderly exit would have to finish
        printed(kind, error, trace)

    sys.excepthook = answer
