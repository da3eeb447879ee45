"""The one LightningModule: an objective's loss (next-token by default; gptexp.finetune.objectives), token-weighted
perplexity, the optimizer (gptexp.training.optim) and its warm-up + cosine schedule."""

from __future__ import annotations

import logging
from dataclasses import asdict, replace

import lightning as L
import torch
from torchmetrics import MeanMetric

from gptexp.core.config import ConfigError
from gptexp.finetune.objectives import NextToken
from gptexp.inference import nf4
from gptexp.models import LanguageModel
from gptexp.training.optim import OptimConfig, build_optimizer, lr_at, unscales_inside

log = logging.getLogger(__name__)

class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite and the run was told to stop (on_nonfinite_loss=stop)."""


class LanguageModelModule(L.LightningModule):
    """Trains any gptexp LanguageModel on its objective's batches: (x, y) token ids for next-token training,
    instruction examples or preference pairs (gptexp.finetune.objectives).

    A non-finite training loss stops the run at once with a message naming the step (the last good
    checkpoint stays), or with on_nonfinite_loss="skip" the step is skipped (no backward, no update)
    and counted in train/skipped_steps.
    """

    def __init__(self, model: LanguageModel, optim: OptimConfig, on_nonfinite_loss: str = "stop",
                 tokenizer: dict | None = None, objective=None, template: str | None = None,
                 system: str | None = None):
        super().__init__()
        if on_nonfinite_loss not in ("stop", "skip"):
            raise ConfigError(f"on_nonfinite_loss must be 'stop' or 'skip', got {on_nonfinite_loss!r}")
        self.model, self.optim, self.on_nonfinite_loss = model, optim, on_nonfinite_loss
        self.tokenizer = tokenizer  # tokenizers.tokenizer_state: kept in checkpoints beside the architecture
        self.objective = objective or NextToken()
        self.template = template  # the template instruction data was written in: kept in checkpoints
        self.system = system  # the system prompt it was given (data.system): kept in checkpoints
        self.val_loss = MeanMetric()  # token-weighted mean cross-entropy over the validation split
        self.val_metrics = torch.nn.ModuleList(MeanMetric() for _ in self.objective.metric_names)
        self.skipped_steps = 0

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the architecture, the tokenizer and a LoRA adapter's settings, so a checkpoint alone rebuilds
        its model and reads and writes its text (python -m gptexp sample, export)."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        checkpoint["gptexp_model"] = {"class": type(base).__name__, "config": asdict(base.config)}
        if self.tokenizer is not None:
            checkpoint["gptexp_tokenizer"] = self.tokenizer
        lora = getattr(self.model, "peft_config", {}).get("default")
        if lora is not None:
            checkpoint["gptexp_lora"] = {"r": lora.r, "alpha": lora.lora_alpha, "target_modules": sorted(lora.target_modules)}
        if self.template is not None:
            checkpoint["gptexp_template"] = self.template
        if self.system is not None:
            checkpoint["gptexp_system"] = self.system
        checkpoint["skipped_steps"] = self.skipped_steps
        if hasattr(self.objective, "state_dict"):  # grpo: the round's rollouts, which the next steps train on
            checkpoint["gptexp_objective"] = self.objective.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_steps = checkpoint.get("skipped_steps", 0)
        if hasattr(self.objective, "load_state_dict"):
            self.objective.load_state_dict(checkpoint.get("gptexp_objective", {}))
        if nf4.is_quantized_state(checkpoint["state_dict"]):  # a QLoRA run resumes on the NF4 base it saved
            nf4.load_state(self, checkpoint["state_dict"])

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        return self.model(idx, targets)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor | None:
        # an objective that normalises by its whole step undoes Lightning's division by the accumulated batches
        # and DDP's mean over processes
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size
        step = self.objective.train(self.model, batch, scale)
        loss = step.loss
        finite = bool(torch.isfinite(loss))
        if self.trainer.world_size > 1:  # every process skips (or stops), or none does
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            return self.nonfinite_loss(loss)
        if self.logging_step():
            synced = self.trainer.world_size > 1
            self.log("train/loss", step.shown, prog_bar=True, sync_dist=synced)
            self.log_dict({f"train/{name}": value for name, value in step.metrics.items()}, sync_dist=synced)
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

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, weight, metrics = self.objective.validate(self.model, batch)
        self.val_loss.update(loss, weight=weight)
        for metric, name in zip(self.val_metrics, self.objective.metric_names):
            value, its_weight = metrics[name] if isinstance(metrics[name], tuple) else (metrics[name], weight)
            metric.update(value, weight=its_weight)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()  # synchronised across processes by torchmetrics
        self.val_loss.reset()
        # the same on every process already; sync_dist=True says so to Lightning, which warns otherwise
        synced = self.trainer.world_size > 1
        logged = {"val/loss": loss}
        if self.objective.name != "preference":  # perplexity is a next-token loss's
            logged["val/ppl"] = loss.exp()
        for metric, name in zip(self.val_metrics, self.objective.metric_names):
            logged[f"val/{name}"] = metric.compute()
            metric.reset()
        self.log_dict(logged, prog_bar=True, sync_dist=synced)
        self.log("steps", float(self.trainer.global_step), sync_dist=synced)  # optimizer steps done: 0 before training

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's mixed-precision plugin refuses to clip for an optimizer that unscales inside its step
        (torch's fused AdamW), even in bf16, where nothing is scaled: clip those gradients with torch here.
        (In 16-mixed, where they are scaled, configure_optimizers makes AdamW unfused instead.)"""
        if gradient_clip_val and unscales_inside(optimizer) and getattr(self.trainer.precision_plugin, "scaler", None) is None:
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        optim, trainer = self.optim, self._trainer
        precision, clipping = (str(trainer.precision), trainer.gradient_clip_val) if trainer else ("32-true", None)
        if clipping and precision == "16-mixed" and optim.fused is not False:
            log.info("16-mixed with gradient clipping: AdamW runs unfused (the fused kernel unscales the gradients "
                     "inside its step, after they must be clipped)")
            optim = replace(optim, fused=False)
        if optim.name == "muon" and trainer is not None and "FSDP" in type(trainer.strategy).__name__:
            raise ConfigError("optim=muon orthogonalises whole weight matrices, which FSDP shards: use trainer=ddp, "
                              "or optim=adamw with trainer=fsdp")
        optimizer = build_optimizer(self.model, optim)
        if clipping and precision == "bf16-mixed" and unscales_inside(optimizer):
            log.info("bf16-mixed with gradient clipping and the fused AdamW: gradients clipped by torch directly "
                     "(Lightning's mixed-precision plugin refuses to)")
        decay_steps = self.optim.decay_steps or self.trainer.max_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_at(step, self.optim, decay_steps) / self.optim.lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
