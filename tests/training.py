"""Running train.py in a subprocess the way a user does, and reading what it wrote."""

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
# a tiny character-level GPT: seconds per run; AdamW in float32 whatever the CPU (the default recipe's Muon and
# the other precisions have tests of their own)
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "data.batch_size=16",
        "data.eval_batch_size=512", "optim.name=adamw", "optim.lr=3e-3", "optim.warmup_steps=5",
        "trainer.max_steps=40", "trainer.val_check_interval=20", "callbacks.samples.max_new_tokens=40",
        "trainer.precision=32-true"]


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


# the columns two runs of the same config and seed must agree on, row for row: the rest are timings, and
# `epoch` counts Lightning's passes over a sampler that spans the whole run (an extended run is in its second)
DETERMINISTIC = ("step", "steps", "train/loss", "train/lr", "val/loss", "val/ppl")


def history(run_dir: Path) -> list[tuple[str, ...]]:
    return [tuple(row.get(name, "") for name in DETERMINISTIC) for row in metrics(run_dir)]


def launch(*overrides: str, run_dir: Path, env: dict | None = None) -> subprocess.Popen:
    """train.py started in the background, to be stopped by the test."""
    return subprocess.Popen([sys.executable, "train.py", *TINY, *overrides, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=(env or os.environ) | {"PYTHONWARNINGS": "ignore"})


def saved_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def checkpoint_at_least(path: Path, step: int):
    """A condition: `path` exists and holds at least `step` optimizer steps."""
    def reached() -> bool:
        try:
            return path.exists() and saved_step(path) >= step
        except (RuntimeError, EOFError, OSError):  # replaced while it was read
            return False
    return reached


class GradientDump(L.Callback):
    """A callback for train.py (+callbacks.grads._target_=training.GradientDump +callbacks.grads.path=<file>): the
    gradients of the first optimizer step, once accumulated (and all-reduced under DDP), before clipping, written
    by rank 0."""

    def __init__(self, path: str):
        self.path = path

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 0 and trainer.is_global_zero:
            torch.save({name: p.grad.detach().clone() for name, p in pl_module.named_parameters()
                        if p.grad is not None}, self.path)
