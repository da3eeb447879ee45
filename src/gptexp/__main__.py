"""python -m gptexp <command> [key=value ...]: run one of gptexp's commands (gptexp.commands)."""

import runpy
import sys

from gptexp.commands import COMMANDS
from gptexp.core.interrupt import answer_while_starting


def main() -> None:
    answer_while_starting()  # Ctrl-C while the command imports torch and Lightning: one line, exit status 130
    name = sys.argv[1] if len(sys.argv) > 1 else None
    if name is None or name in ("-h", "--help"):
        listing = "\n".join(f"  {command:8s} {what}" for command, what in COMMANDS.items())
        print(f"python -m gptexp <command> [key=value ...], the commands:\n{listing}", file=sys.stderr)
        sys.exit(0 if name else 2)
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}: choose {', '.join(COMMANDS)} (python -m gptexp --help says "
              f"what each does)", file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"gptexp {name}", *sys.argv[2:]]
    runpy.run_module(f"gptexp.commands.{name}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
