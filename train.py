"""Train a language model: python train.py [group=option ...] [key=value ...]  (see README.md)."""

if __name__ == "__main__":
    from gptexp.core.interrupt import answer_while_starting

    answer_while_starting()  # Ctrl-C while torch and Lightning import: one line, exit status 130
    from gptexp.commands.cli import run_command
    from gptexp.commands.train import app

    run_command(app)
