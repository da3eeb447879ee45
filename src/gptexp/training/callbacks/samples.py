"""Text samples during training: what the model writes, at chosen steps and after every validation."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from gptexp.core.writing import writing
from gptexp.data.tokenizers import end_of_text_ids, prompt_ids
from gptexp.inference.generation import check_sampling


class TextSamples(L.Callback):
    """Generate from `prompt` after the optimizer steps in `at_steps` (e.g. 5, 100, 1600) and, with
    `after_validation`, after every validation. Each sample is appended to `<output_dir>/samples.md`
    and to a wandb table `samples` (step, val/loss, text); its time is logged as time/sample_ms.
    The tokenizer is the data module's; with instruction data, the prompt is the first validation example's
    request in its template, and the answer ends at its EOS. Sampling uses its own seeded generator, so it never
    moves the training RNG.
    """

    def __init__(self, output_dir: str, prompt: str = "\n", max_new_tokens: int = 200, temperature: float = 0.8,
                 top_k: int | None = 200, top_p: float | None = None, seed: int = 0,
                 at_steps: tuple[int, ...] = (), after_validation: bool = True):
        check_sampling(temperature, top_k, top_p)
        self.path = Path(output_dir) / "samples.md"
        self.prompt, self.max_new_tokens = prompt, max_new_tokens
        self.temperature, self.top_k, self.top_p, self.seed = temperature, top_k, top_p, seed
        self.at_steps, self.after_validation = set(at_steps), after_validation
        self.rows: list[list] = []
        self.durations_ms: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.at_steps:
            self.at_steps.discard(trainer.global_step)  # once, though accumulation repeats a step number
            self.sample(trainer, pl_module, val_loss=None)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.after_validation and not trainer.sanity_checking:
            self.sample(trainer, pl_module, val_loss=float(trainer.callback_metrics.get("val/loss", float("nan"))))

    @rank_zero_only
    def sample(self, trainer: L.Trainer, pl_module: L.LightningModule, val_loss: float | None) -> None:
        start = time.perf_counter()
        tokenizer, model = trainer.datamodule.tokenizer, pl_module.model
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(self.seed)
        request = getattr(trainer.datamodule, "sample_prompt", None)
        ids = request() if request else prompt_ids(tokenizer, self.prompt)
        idx = torch.tensor([ids[-model.context_length:]], device=device)
        out = model.generate(idx, self.max_new_tokens, self.temperature, self.top_k, self.top_p, generator=generator)
        out = out[0].tolist()
        if request:  # the answer ends at its EOS
            ends = [i for i, token in enumerate(out) if i >= len(ids) and token in end_of_text_ids(tokenizer)]
            out = out[:ends[0]] if ends else out
        text = tokenizer.decode(out)
        self.write(trainer.global_step, val_loss, text)
        self.rows.append([trainer.global_step, float("nan") if val_loss is None else val_loss, text])
        self.durations_ms.append(1e3 * (time.perf_counter() - start))
        for logger in trainer.loggers:
            logger.log_metrics({"time/sample_ms": self.durations_ms[-1], "steps": trainer.global_step},
                               step=trainer.global_step)
            if isinstance(logger, WandbLogger):  # a wandb table is immutable: log all rows so far
                logger.log_text(key="samples", columns=["step", "val_loss", "text"], data=self.rows)
            elif isinstance(logger, TensorBoardLogger):  # TensorBoard's text tab shows markdown, a step at a time
                logger.experiment.add_text("samples", self.entry(trainer.global_step, val_loss, text),
                                           global_step=trainer.global_step)
            elif isinstance(logger, MLFlowLogger):  # a file per sample among the run's artifacts
                logger.experiment.log_text(logger.run_id, self.entry(trainer.global_step, val_loss, text),
                                           f"samples/step_{trainer.global_step:07d}.md")

    @staticmethod
    def entry(step: int, val_loss: float | None, text: str) -> str:
        heading = f"## after {step} steps" + ("" if val_loss is None else f" (val/loss {val_loss:.4f})")
        return f"{heading}\n\n```text\n{text}\n```\n\n"

    def write(self, step: int, val_loss: float | None, text: str) -> None:
        with writing(self.path), open(self.path, "a", encoding="utf-8") as f:  # the run directory is not remade
            f.write(self.entry(step, val_loss, text))
