"""Train a language model: python train.py [group=option ...] [key=value ...]  (see README.md)."""

import hydra

from gptexp.cli import run_command
from gptexp.train import main as train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    run_command(main)
