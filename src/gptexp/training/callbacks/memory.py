"""Memory and tensor allocations of training steps.

CUDA: the caching allocator's statistics, every step at no cost: mem/peak_allocated_mb and
mem/peak_reserved_mb per logging interval, mem/allocations and mem/allocated_mb per step; and
optionally a snapshot file for PyTorch's memory viewer (https://pytorch.org/memory_viz).
CPU: mem/peak_rss_mb, the process's peak resident set per interval; tensor allocations are
counted by a TorchDispatchMode on one step in every `count_every` (it slows that step down).
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from gptexp.core.memory import PeakMemory

log = logging.getLogger(__name__)
MB = 2**20


class AllocationCounter(TorchDispatchMode):
    """Counts the tensors that operators create with new storage (views and in-place results share
    their input's storage and are not allocations), and their bytes."""

    def __init__(self):
        super().__init__()
        self.count, self.bytes = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                nbytes = tensor.untyped_storage().nbytes()
                if nbytes:
                    self.count += 1
                    self.bytes += nbytes
        return out


class MemoryMonitor(L.Callback):
    def __init__(self, count_every: int = 0, snapshot_at_step: int | None = None, output_dir: str | None = None):
        if count_every < 0:
            raise ValueError(f"count_every must be >= 0 (0: never count CPU allocations), got {count_every}")
        self.count_every, self.snapshot_at_step = count_every, snapshot_at_step
        self.output_dir = Path(output_dir) if output_dir else None
        self.peak: PeakMemory | None = None
        self.counter: AllocationCounter | None = None
        self.steps: list[tuple[int, int]] = []  # (allocations, bytes) per measured step in this interval

    def on_train_start(self, trainer, pl_module) -> None:
        self.cuda = pl_module.device.type == "cuda"
        if self.cuda and self.snapshot_at_step is not None:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        self.peak = PeakMemory(pl_module.device).__enter__()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.cuda:
            stats = torch.cuda.memory_stats(pl_module.device)
            self.before = (stats["allocation.all.allocated"], stats["allocated_bytes.all.allocated"])
        elif self.count_every and trainer.global_step % self.count_every == 0 and self.counter is None:
            self.counter = AllocationCounter().__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.cuda:
            stats = torch.cuda.memory_stats(pl_module.device)
            self.steps.append((stats["allocation.all.allocated"] - self.before[0],
                               stats["allocated_bytes.all.allocated"] - self.before[1]))
            if trainer.global_step == self.snapshot_at_step:
                self.dump_snapshot()
        elif self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.steps.append((self.counter.count, self.counter.bytes))
            self.counter = None
        if trainer.global_step % trainer.log_every_n_steps == 0:
            self.log_interval(pl_module)

    def log_interval(self, pl_module: L.LightningModule) -> None:
        self.peak.__exit__(None, None, None)
        if self.cuda:
            metrics = {"mem/peak_allocated_mb": self.peak.peak / MB,
                       "mem/peak_reserved_mb": torch.cuda.max_memory_reserved(pl_module.device) / MB}
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        else:
            metrics = {"mem/peak_rss_mb": self.peak.peak / MB}
        if self.steps:
            metrics["mem/allocations"] = sum(c for c, _ in self.steps) / len(self.steps)
            metrics["mem/allocated_mb"] = sum(b for _, b in self.steps) / len(self.steps) / MB
            self.steps = []
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        self.peak = PeakMemory(pl_module.device).__enter__()

    def dump_snapshot(self) -> None:
        path = (self.output_dir or Path(".")) / "memory_snapshot.pickle"
        torch.cuda.memory._dump_snapshot(str(path))
        torch.cuda.memory._record_memory_history(enabled=None)
        log.info("CUDA memory snapshot written to %s: open it at https://pytorch.org/memory_viz", path)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.counter = None
