"""Train a language model: python train.py [group=option ...] [key=value ...]  (see README.md)."""

from gptexp.commands.cli import run_command
from gptexp.commands.train import app

if __name__ == "__main__":
    run_command(app)
