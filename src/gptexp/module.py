"""The one LightningModule: next-token loss, token-weighted perplexity, AdamW with warm-up + cosine decay."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import lightning as L
import torch
from torchmetrics import MeanMetric

from gptexp.config import ConfigError
from gptexp.models import LanguageModel


FUSED_ADAMW_DEVICES = ("cpu", "cuda", "mps", "xpu")


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate, reached after warmup_steps
    min_lr: float = 1e-4  # the cosine decays to this, and stays there
    weight_decay: float = 0.1  # on matrices and embeddings only, never on biases or norms
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    warmup_steps: int = 100
    decay_steps: int | None = None  # end of the cosine, in optimizer steps; null: trainer.max_steps
    fused: bool | None = None  # torch's fused AdamW kernel; null: used where torch has it (CPU, CUDA, ...)

    def __post_init__(self):
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}; set both, "
                             f"e.g. optim.lr={self.lr:g} optim.min_lr={self.lr / 10:g}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.eps <= 0:
            raise ValueError("warmup_steps, weight_decay must be >= 0 and eps > 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")


def adamw(params: list[torch.Tensor], optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW as `optim` says, weight decay on matrices and embeddings only."""
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": optim.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = optim.fused
    if fused is None:  # the fused kernel: one pass per step, 3-4x faster than the per-tensor loop on a CPU
        fused = all(p.is_floating_point() and p.device.type in FUSED_ADAMW_DEVICES for p in params)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, fused=fused)


def lr_at(step: int, optim: OptimConfig, decay_steps: int) -> float:
    """Linear warm-up from lr/warmup_steps to lr, cosine decay to min_lr at decay_steps, then min_lr."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if step >= decay_steps:
        return optim.min_lr
    progress = (step - optim.warmup_steps) / max(1, decay_steps - optim.warmup_steps)
    return optim.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (optim.lr - optim.min_lr)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite and the run was told to stop (on_nonfinite_loss=stop)."""


class LanguageModelModule(L.LightningModule):
    """Trains any gptexp LanguageModel on (x, y) batches of token ids.

    A non-finite training loss stops the run at once with a message naming the step (the last good
    checkpoint stays), or with on_nonfinite_loss="skip" the step is skipped (no backward, no update)
    and counted in train/skipped_steps.
    """

    def __init__(self, model: LanguageModel, optim: OptimConfig, on_nonfinite_loss: str = "stop"):
        super().__init__()
        if on_nonfinite_loss not in ("stop", "skip"):
            raise ConfigError(f"on_nonfinite_loss must be 'stop' or 'skip', got {on_nonfinite_loss!r}")
        self.model, self.optim, self.on_nonfinite_loss = model, optim, on_nonfinite_loss
        self.val_loss = MeanMetric()  # token-weighted mean cross-entropy over the validation split
        self.skipped_steps = 0

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the architecture, so a checkpoint alone rebuilds its model (gptexp.export)."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        checkpoint["gptexp_model"] = {"class": type(base).__name__, "config": asdict(base.config)}
        checkpoint["skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_steps = checkpoint.get("skipped_steps", 0)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        return self.model(idx, targets)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        _, loss = self.model(*batch)
        finite = bool(torch.isfinite(loss))
        if self.trainer.world_size > 1:  # every process skips (or stops), or none does
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            return self.nonfinite_loss(loss)
        if self.logging_step():
            self.log("train/loss", loss, prog_bar=True, sync_dist=self.trainer.world_size > 1)
            self.log_dict({"train/lr": self.lr_schedulers().get_last_lr()[0],
                           "steps": float(self.trainer.global_step + 1)})  # optimizer steps done, this one included
        return loss

    def nonfinite_loss(self, loss: torch.Tensor) -> None:
        step = self.trainer.global_step + 1
        if self.on_nonfinite_loss == "stop":
            raise NonFiniteLossError(
                f"the training loss is {loss.item()} at step {step}; the run stopped and its last checkpoint "
                f"is the last good one. Lower optim.lr, keep trainer.gradient_clip_val, or set "
                f"on_nonfinite_loss=skip to skip such steps")
        self.skipped_steps += 1
        self.log("train/skipped_steps", float(self.skipped_steps))
        return None  # Lightning then skips backward and the optimizer update of this step

    def logging_step(self) -> bool:
        """Whether the step under way is one Lightning writes to the loggers (every log_every_n_steps, and
        the last): a self.log call costs about 0.5 ms on a CPU, 1% of a miniGPT step: too much for every step."""
        step = self.trainer.global_step + 1
        return step % self.trainer.log_every_n_steps == 0 or step >= self.trainer.max_steps

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.trainer.global_step >= self.trainer.max_steps:
            self.trainer.should_stop = True  # Lightning then validates once more: every run ends measured

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        _, loss = self.model(x, y)
        self.val_loss.update(loss, weight=(y != -1).sum())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()  # synchronised across processes by torchmetrics
        self.val_loss.reset()
        self.log_dict({"val/loss": loss, "val/ppl": loss.exp()}, prog_bar=True)
        self.log("steps", float(self.trainer.global_step))  # optimizer steps done: 0 before training

    def configure_optimizers(self):
        optimizer = adamw([p for p in self.model.parameters() if p.requires_grad], self.optim)
        decay_steps = self.optim.decay_steps or self.trainer.max_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_at(step, self.optim, decay_steps) / self.optim.lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
