"""A run's history across stops and resumes. Every checkpoint records how much of metrics.csv and
samples.md it has seen (the metrics logged so far are flushed to disk first); a run resumed from it,
in its own directory or in a new one, starts from exactly that history. Steps redone after a crash
then replace their first record instead of repeating it, and either directory alone tells the whole run."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning as L

from gptexp.core.writing import replace_atomically
from gptexp.training.callbacks.samples import TextSamples
from gptexp.training.checkpoint_io import ForwardingCheckpointIO
from gptexp.training.loggers import MetricsCSVLogger, read_metrics, write_metrics

log = logging.getLogger(__name__)
METRICS, SAMPLES = "metrics.csv", "samples.md"


def run_dir_of(checkpoint_path: str | os.PathLike) -> Path:
    """The run directory a checkpoint belongs to: <run>/checkpoints/<name>.ckpt, or the file's folder."""
    folder = Path(checkpoint_path).resolve().parent
    return folder.parent if folder.name == "checkpoints" else folder


def carry_over(checkpoint_path: str | os.PathLike | None, checkpoint: dict, run_dir: str | os.PathLike) -> str:
    """Make `run_dir`'s metrics.csv and samples.md the history `checkpoint` (read from checkpoint_path)
    had seen: its own directory's files cut back to it, or a new directory's copied from the old one.
    With no checkpoint the run starts from step 0, and what the directory holds is about to be redone.
    Returns a line saying what was kept. A checkpoint without a record keeps the rows of earlier steps."""
    run_dir = Path(run_dir).resolve()
    source = run_dir_of(checkpoint_path) if checkpoint_path else run_dir
    record = checkpoint.get("gptexp_history") if checkpoint_path else {"metrics_rows": 0, "samples_bytes": 0}
    keys, rows = read_metrics(source / METRICS)
    if record:
        rows = rows[:record["metrics_rows"]]
    else:
        rows = [row for row in rows if row.get("step") and int(float(row["step"])) < checkpoint.get("global_step", 0)]
    if keys:
        write_metrics(run_dir / METRICS, keys, rows)
    elif (run_dir / METRICS).exists():  # the checkpoint saw no metrics: none of this directory's are its
        (run_dir / METRICS).unlink()
    samples = (source / SAMPLES).read_bytes() if (source / SAMPLES).is_file() else b""
    if record:
        samples = samples[:record["samples_bytes"]]
    if samples or (run_dir / SAMPLES).exists():
        replace_atomically(run_dir / SAMPLES, samples)
    origin = "" if source == run_dir else f" (copied from {source})"
    return f"{len(rows)} rows of metrics.csv and {samples.count(b'## after')} samples kept{origin}"


class HistoryCheckpointIO(ForwardingCheckpointIO):
    """Adds the history record to each checkpoint just before it is written."""

    def __init__(self, inner, annotate):
        super().__init__(inner)
        self.annotate = annotate

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        self.annotate(checkpoint)
        super().save_checkpoint(checkpoint, path, storage_options=storage_options)


class RunHistory(L.Callback):
    """Writes into every checkpoint `gptexp_history`: the rows of metrics.csv and the bytes of samples.md
    on disk when it was written, after flushing the metrics logged so far (so a checkpoint never claims
    history that a crash could lose)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.trainer = trainer
        strategy = trainer.strategy
        if not isinstance(strategy.checkpoint_io, HistoryCheckpointIO):
            strategy.checkpoint_io = HistoryCheckpointIO(strategy.checkpoint_io, self.annotate)

    def annotate(self, checkpoint: dict) -> None:
        record = {"metrics_rows": 0, "samples_bytes": 0}
        for logger in self.trainer.loggers:
            if isinstance(logger, MetricsCSVLogger):
                record["metrics_rows"] = logger.experiment.sync()
        for callback in self.trainer.callbacks:
            if isinstance(callback, TextSamples) and callback.path.is_file():
                record["samples_bytes"] = callback.path.stat().st_size
        checkpoint["gptexp_history"] = record
