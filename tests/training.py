"""Running train.py in a subprocess the way a user does, and reading what it wrote."""

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a tiny character-level GPT: seconds per run
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "data.batch_size=16",
        "data.eval_batch_size=512", "optim.lr=3e-3", "optim.warmup_steps=5", "trainer.max_steps=40",
        "trainer.val_check_interval=20", "callbacks.samples.max_new_tokens=40"]


def train(*overrides: str, run_dir: Path | None = None, multirun: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, "train.py", *(["-m"] if multirun else []), *TINY, *overrides]
    if run_dir is not None:
        command.append(f"hydra.{'sweep' if multirun else 'run'}.dir={run_dir}")
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"PYTHONWARNINGS": "ignore"})


def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict], name: str, step: str = "step") -> list[tuple[int, float]]:
    return [(int(float(r[step])), float(r[name])) for r in rows if r.get(name)]
