"""Where each training step's time goes: data wait, rollout (an objective that writes its own inputs, finetune=grpo),
forward, backward, optimizer step; plus
validation, sampling and checkpoint writes. Logged as time/<phase>_ms (means over each logging
interval) and summarised in a table at the end of fit; time/startup_s is the wall time from the command
(the process's start) to the first training step."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import lightning as L
import psutil
import torch
from lightning.pytorch.utilities import rank_zero_info

from gptexp.training.checkpoint_io import ForwardingCheckpointIO

STEP_PHASES = ("data", "rollout", "forward", "backward", "optimizer")  # in the order they happen


def seconds_since_process_start() -> float:
    return time.time() - psutil.Process().create_time()


def sampling_ms(trainer: L.Trainer) -> float:
    """Time spent so far by callbacks that time themselves (TextSamples' durations_ms), which must not
    count as training time when it falls between two steps."""
    return sum(sum(getattr(callback, "durations_ms", ())) for callback in trainer.callbacks)


class Clock:
    """Marks points in time: CUDA events on a GPU (read only when needed, so no extra synchronisation),
    the host clock otherwise."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end)
        return 1e3 * (end - start)


class TimedCheckpointIO(ForwardingCheckpointIO):
    """Wraps the strategy's checkpoint writer to time every save."""

    def __init__(self, inner, record):
        super().__init__(inner)
        self.record = record

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        start = time.perf_counter()
        super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        self.record("checkpoint", 1e3 * (time.perf_counter() - start))


class PhaseTimer(L.Callback):
    """Per-step phase times from Lightning's hooks: data = end of the last step to the start of this one
    (loading, transfer, loop overhead; sampling and checkpoint writes in between are left out), forward =
    start to backward (zero_grad, forward, loss; less the rollout, which an objective with one times itself in
    `rollout_seconds`), backward = backward to the optimizer hook, optimizer =
    clipping, step and scheduler (0 on accumulation steps). The first step and the first after each
    validation are not timed: they have no data wait of their own."""

    def __init__(self):
        self.clock = None
        self.marks: dict[str, object] = {}
        self.pending: list[dict[str, tuple]] = []  # per step: phase -> (start mark, end mark)
        self.interval: dict[str, list[float]] = defaultdict(list)
        self.totals: dict[str, list[float]] = defaultdict(list)
        self.last_end = None
        self.other_ms_at_end = 0.0  # sampling + checkpoint time recorded when the last step ended
        self.startup_s = None  # process start to the first training step of this process

    def other_ms(self, trainer: L.Trainer) -> float:
        return sampling_ms(trainer) + sum(self.totals.get("checkpoint", ()))

    def record(self, phase: str, ms: float) -> None:
        self.interval[phase].append(ms)
        self.totals[phase].append(ms)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.clock = Clock(pl_module.device)
        strategy = trainer.strategy
        if not isinstance(strategy.checkpoint_io, TimedCheckpointIO):
            strategy.checkpoint_io = TimedCheckpointIO(strategy.checkpoint_io, self.record)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.startup_s is None:
            self.startup_s = seconds_since_process_start()
            pl_module.log("time/startup_s", self.startup_s, on_step=True, on_epoch=False)
        self.marks = {"start": self.clock.mark()}
        self.marks["other_ms"] = self.other_ms(trainer) - self.other_ms_at_end  # sampled or saved since the last step
        self.marks["rollout_s"] = getattr(getattr(pl_module, "objective", None), "rollout_seconds", None)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.marks["backward"] = self.clock.mark()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.marks["optimizer"] = self.clock.mark()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        end, m = self.clock.mark(), self.marks
        rolled = m["rollout_s"] is not None
        rollout_ms = 1e3 * (pl_module.objective.rollout_seconds - m["rollout_s"]) if rolled else 0.0
        if self.last_end is not None:  # the first step, and the first after a validation, have no data wait
            self.pending.append({"data": (self.last_end, m["start"], m["other_ms"]),
                                 **({"rollout": rollout_ms} if rolled else {}),
                                 "forward": (m["start"], m.get("backward", end), rollout_ms),
                                 "backward": (m.get("backward", end), m.get("optimizer", end), 0.0),
                                 "optimizer": (m.get("optimizer", end), end, 0.0)})
        self.last_end = end
        self.other_ms_at_end = self.other_ms(trainer)
        if trainer.global_step % trainer.log_every_n_steps == 0 or trainer.should_stop:
            self.resolve()
            metrics = {f"time/{phase}_ms": statistics.fmean(v) for phase, v in self.interval.items() if v}
            self.interval = defaultdict(list)
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def resolve(self) -> None:
        """Turn the marks of the steps since the last call into phase times."""
        for step in self.pending:
            phases = {phase: marks if isinstance(marks, float) else max(0.0, self.clock.ms(marks[0], marks[1]) - marks[2])
                      for phase, marks in step.items()}
            for phase, ms in phases.items():
                self.record(phase, ms)
            self.record("step", sum(phases.values()))
        self.pending = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.last_end = None  # an epoch boundary is not data wait

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.validation_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        ms = 1e3 * (time.perf_counter() - self.validation_start)
        self.totals["validation"].append(ms)
        pl_module.log("time/validation_ms", ms, sync_dist=trainer.world_size > 1)  # the processes' mean
        self.last_end = None  # the next step's wait is not data loading

    def on_fit_end(self, trainer, pl_module) -> None:
        self.resolve()
        for callback in trainer.callbacks:  # the samples callback times itself
            self.totals["sample"] += getattr(callback, "durations_ms", [])
        rank_zero_info(self.summary())

    def summary(self) -> str:
        """A table: each phase's count, median and mean in ms, and the share of the step (or of the run)."""
        step = statistics.fmean(self.totals["step"]) if self.totals.get("step") else float("nan")
        lines = [f"first training step {self.startup_s:.1f} s after the command started"] if self.startup_s else []
        lines += ["time per phase", f"{'phase':<12}{'count':>7}{'median ms':>12}{'mean ms':>10}{'share':>8}"]
        for phase in (*STEP_PHASES, "step", "validation", "sample", "checkpoint"):
            values = self.totals.get(phase)
            if values:
                mean = statistics.fmean(values)
                share = f"{100 * mean / step:6.1f}%" if phase in STEP_PHASES else ""
                lines.append(f"{phase:<12}{len(values):>7}{statistics.median(values):>12.2f}{mean:>10.2f}{share:>8}")
        return "\n".join(lines)
