"""What makes a resumed run the run that never stopped, and a stopped run resumable: every RNG state and
the wandb run id travel in the checkpoint; last.ckpt is written after every validation and on a schedule, and
SIGTERM and Ctrl-C end the run after the step under way with one. (Optimizer, scheduler, scaler, step counters
and the data position are Lightning's and the data module's to restore; metrics.csv and samples.md,
callbacks.history's.)"""

from __future__ import annotations

import logging
import os
import random
import signal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

log = logging.getLogger(__name__)


def rng_states() -> dict:
    """Every RNG's state as tensors and plain data (a checkpoint then loads weights-only, with nothing else)."""
    kind, key, position, has_gauss, cached_gaussian = np.random.get_state()
    numpy = {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "position": position,
             "has_gauss": has_gauss, "cached_gaussian": cached_gaussian}
    states = {"python": random.getstate(), "numpy": numpy, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Put back what rng_states took (or, from checkpoints written before 2026-12-04, NumPy's own state tuple)."""
    random.setstate(states["python"])
    numpy = states["numpy"]
    if isinstance(numpy, dict):
        numpy = (numpy["kind"], numpy["key"].numpy().astype(np.uint32), numpy["position"], numpy["has_gauss"],
                 numpy["cached_gaussian"])
    np.random.set_state(numpy)
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def wandb_id(trainer: L.Trainer) -> str | None:
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return logger.version
    return None


def mlflow_run_id(trainer: L.Trainer) -> str | None:
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            return logger.run_id
    return None


class ResumeState(L.Callback):
    """Stores the RNG states (Python, NumPy, torch, CUDA) and the wandb and MLflow run ids in every checkpoint, and
    puts the RNG states back just before the first step of a resumed run: after Lightning's set-up,
    exactly where the saving run was."""

    def __init__(self):
        self.pending: dict | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["gptexp_resume"] = {"rng": rng_states(), "wandb_id": wandb_id(trainer),
                                       "mlflow_run_id": mlflow_run_id(trainer)}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self.pending = checkpoint.get("gptexp_resume", {}).get("rng")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.pending is not None:
            set_rng_states(self.pending)
            self.pending = None


class StopRequested(SystemExit):
    """Raised after the checkpoint of a SIGTERM / Ctrl-C stop is written; exits with 128 + the signal."""


def saves_last(trainer: L.Trainer, path: str) -> bool:
    """Whether a ModelCheckpoint writes `path` as its last checkpoint after each validation."""
    return any(isinstance(c, ModelCheckpoint) and c.save_last and c.dirpath
               and os.path.join(c.dirpath, c.CHECKPOINT_NAME_LAST + c.FILE_EXTENSION) == path
               for c in trainer.callbacks)


class BestAndLast(ModelCheckpoint):
    """Lightning's ModelCheckpoint (best.ckpt: the best validation by the monitored metric), with last.ckpt written
    after every validation: Lightning 2.6 writes it only when it writes a new best, so a run whose last validation
    was not its best kept an older last.ckpt, which is where it would resume and what `checkpoint=last` reads."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def _generate_state_key(self, **kwargs) -> str:
        return f"ModelCheckpoint{kwargs!r}"  # Lightning's own key: runs written before this class resume with it

    def _save_last_if_missed(self, trainer) -> None:
        if (self.save_last and not self._should_skip_saving_checkpoint(trainer)
                and self._last_global_step_saved != trainer.global_step):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class ResumePoint(L.Callback):
    """Writes `path` (the run's last.ckpt), where a killed or stopped run resumes: every `every_n_steps`
    optimizer steps (null: never on a schedule), and when SIGTERM or Ctrl-C asks the run to stop, after
    the step under way; the run then exits with 128 + the signal number, loggers closed (a second
    Ctrl-C stops at once). Under SLURM, Lightning's own SIGUSR1 handler checkpoints and requeues the job.

    The state is taken at the end of a step and written at the next hook, once Lightning has logged
    that step's metrics: a checkpoint never precedes history it claims (callbacks.history). A step that
    validates is saved after its validation instead (by the ModelCheckpoint that writes last.ckpt, or
    here at a stop without one): resumed from the step before it, Lightning would skip that validation.
    """

    def __init__(self, path: str, every_n_steps: int | None = 200):
        if every_n_steps is not None and every_n_steps <= 0:
            raise ValueError(f"callbacks.resume_point.every_n_steps must be positive or null, got {every_n_steps}")
        self.path, self.every_n_steps = path, every_n_steps
        self.pending: dict | None = None  # a state taken, to be written at the next hook
        self.taken_at = -1
        self.stopping = self.deferred = False
        self.received: int | None = None
        self.previous: dict[int, object] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.received = signum
        log.warning("received %s: stopping after this step with a checkpoint", signal.Signals(signum).name)

    def _restore_handlers(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # inside a step's gradient accumulation
        stop = self.received is not None
        if trainer.world_size > 1:  # a signal to one process stops them all, at the same step
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        step = trainer.global_step
        due = self.every_n_steps and step % self.every_n_steps == 0 and step != self.taken_at
        if stop or due:
            self.take(trainer)
        self.stopping = stop

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.deferred = self.pending is not None or self.stopping  # this step is saved after its validation
            self.pending = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and self.deferred and not saves_last(trainer, self.path):
            self.take(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.write(trainer)
        if self.stopping:
            signum = self.received or signal.SIGTERM
            log.warning("stopped by %s after step %d; checkpoint written to %s (run the same command to resume, "
                        "or pass ckpt_path=%s)", signal.Signals(signum).name, trainer.global_step, self.path,
                        self.path)
            raise StopRequested(128 + signum)

    def on_train_end(self, trainer, pl_module) -> None:
        self.write(trainer)
        self._restore_handlers()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore_handlers()

    def take(self, trainer: L.Trainer) -> None:
        """The checkpoint trainer.save_checkpoint would write now (all processes take part, as there)."""
        self.pending = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        self.taken_at = trainer.global_step

    def write(self, trainer: L.Trainer) -> None:
        if self.pending is not None:
            checkpoint, self.pending = self.pending, None
            trainer.strategy.save_checkpoint(checkpoint, self.path)
            trainer.strategy.barrier("ResumePoint.write")
