"""What makes a resumed run the run that never stopped, and a stopped run resumable: every RNG state and
the wandb run id travel in the checkpoint; SIGTERM and Ctrl-C end the run after the step under way with
a checkpoint. (Optimizer, scheduler, scaler, step counters and the data position are Lightning's and
the data module's to restore.)"""

from __future__ import annotations

import logging
import random
import signal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)


def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def wandb_id(trainer: L.Trainer) -> str | None:
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return logger.version
    return None


class ResumeState(L.Callback):
    """Stores the RNG states (Python, NumPy, torch, CUDA) and the wandb run id in every checkpoint, and
    puts the RNG states back just before the first step of a resumed run: after Lightning's set-up,
    exactly where the saving run was."""

    def __init__(self):
        self.pending: dict | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["gptexp_resume"] = {"rng": rng_states(), "wandb_id": wandb_id(trainer)}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self.pending = checkpoint.get("gptexp_resume", {}).get("rng")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.pending is not None:
            set_rng_states(self.pending)
            self.pending = None


class PeriodicCheckpoint(L.Callback):
    """Write `path` (the run's last.ckpt) every `every_n_steps` optimizer steps: the point a killed run
    resumes from. (Lightning's ModelCheckpoint would also write one when training ends, an end-of-epoch
    state that resumes into a new epoch; this writes only mid-run states.)"""

    def __init__(self, path: str, every_n_steps: int = 200):
        if every_n_steps <= 0:
            raise ValueError(f"callbacks.resume_point.every_n_steps must be positive, got {every_n_steps}")
        self.path, self.every_n_steps = path, every_n_steps
        self.saved_at = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step  # the same over the micro-batches of gradient accumulation: save once
        if step % self.every_n_steps == 0 and step != self.saved_at and step < trainer.max_steps:
            trainer.save_checkpoint(self.path)  # (the last step validates, and the checkpoint callback saves)
            self.saved_at = step


class StopRequested(SystemExit):
    """Raised after the checkpoint of a SIGTERM / Ctrl-C stop is written; exits with 128 + the signal."""


class GracefulStop(L.Callback):
    """On SIGTERM or SIGINT (Ctrl-C), finish the step under way, write `checkpoint_path` (atomically, through
    the trainer's checkpoint writer) and exit with 128 + the signal number, loggers closed. A second
    Ctrl-C stops at once. Under SLURM, Lightning's own SIGUSR1 handler checkpoints and requeues the job."""

    def __init__(self, checkpoint_path: str):
        self.checkpoint_path = checkpoint_path
        self.received: int | None = None
        self.previous: dict[int, object] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, self._handle)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handlers()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.received = signum
        log.warning("received %s: stopping after this step with a checkpoint", signal.Signals(signum).name)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:  # a signal to one process stops them all, at the same step
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        trainer.save_checkpoint(self.checkpoint_path)
        signum = self.received or signal.SIGTERM
        name = signal.Signals(signum).name
        log.warning("stopped by %s after step %d; checkpoint written to %s (resume with ckpt_path=%s)", name,
                    trainer.global_step, self.checkpoint_path, self.checkpoint_path)
        raise StopRequested(128 + signum)
