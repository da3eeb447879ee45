"""Training speed: tokens/s, samples/s and model FLOPs utilisation, over each logging interval.

Lightning's ThroughputMonitor does not fit here: it knows no peak for a CPU and names its metrics
its own way; gptexp measures the CPU's peak and keeps the fastest per machine (gptexp.core.hardware), and
logs perf/*.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from gptexp.core.hardware import kept_peak_flops
from gptexp.data import batch_inputs
from gptexp.training.callbacks.timing import Clock, sampling_ms

HALF_PRECISIONS = ("bf16-mixed", "bf16-true", "16-mixed", "16-true", "bf16", "16")


def training_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """The model's forward + backward FLOPs per token; a frozen weight (LoRA's base) skips its weight
    gradient, 2 of its 6 FLOPs per token."""
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return model.flops_per_token(seq_len) - 2 * frozen


class Throughput(L.Callback):
    """perf/tokens_per_sec, perf/samples_per_sec and perf/mfu, measured from the start of each step to
    the start of the next (data loading included; validation, sampling and checkpoints excluded), in
    all processes together."""

    def __init__(self):
        self.clock = None
        self.pending: list[tuple] = []  # (start mark, end mark, ms to leave out, tokens, samples)
        self.last = None  # (mark, sampling ms, tokens, samples) at the start of the previous step
        self.flops: dict[int, float] = {}  # training FLOPs per token, by sequence length

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.clock = Clock(pl_module.device)
        dtype = torch.bfloat16 if str(trainer.precision) in HALF_PRECISIONS else torch.float32
        self.peak, source = kept_peak_flops(pl_module.device, dtype)  # a CPU's is measured once per machine
        rank_zero_info(f"MFU against {self.peak / 1e12:.3g} TFLOP/s ({source})")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now, sampled = self.clock.mark(), sampling_ms(trainer)
        if self.last is not None:
            start, sampled_then, tokens, samples = self.last
            self.pending.append((start, now, sampled - sampled_then, tokens, samples))
        x = batch_inputs(batch)
        self.last = (now, sampled, x.numel(), x.size(0)) if x is not None else None  # prompts: no inputs counted

    def on_validation_start(self, trainer, pl_module) -> None:
        self.last = None  # a step cut by validation is not counted

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % trainer.log_every_n_steps or not self.pending:
            return
        ms = sum(max(1e-9, self.clock.ms(start, end) - other) for start, end, other, _, _ in self.pending)
        tokens = sum(p[3] for p in self.pending) * trainer.world_size
        samples = sum(p[4] for p in self.pending) * trainer.world_size
        self.pending = []
        tokens_per_sec = 1e3 * tokens / ms
        seq_len = batch_inputs(batch).size(1)  # a batch of prompts never gets here: self.pending stays empty
        if seq_len not in self.flops:
            self.flops[seq_len] = training_flops_per_token(pl_module.model, seq_len)
        flops = self.flops[seq_len]
        pl_module.log_dict({"perf/tokens_per_sec": tokens_per_sec, "perf/samples_per_sec": 1e3 * samples / ms,
                            "perf/mfu": flops * tokens_per_sec / (self.peak * trainer.world_size)},
                           on_step=True, on_epoch=False)
