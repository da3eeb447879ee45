"""Text samples during training: what the model writes, recorded after every validation."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from gptexp.data.tokenizers import prompt_ids
from gptexp.models.generation import check_sampling


class TextSamples(L.Callback):
    """After each validation, generate from `prompt` and append the text to `<output_dir>/samples.md`
    and to a wandb table `samples` (step, val/loss, text). The tokenizer is the data module's.

    Sampling uses its own seeded generator, so it never moves the training RNG.
    """

    def __init__(self, output_dir: str, prompt: str = "\n", max_new_tokens: int = 200,
                 temperature: float = 0.8, top_k: int | None = 200, top_p: float | None = None, seed: int = 0):
        check_sampling(temperature, top_k, top_p)
        self.path = Path(output_dir) / "samples.md"
        self.prompt, self.max_new_tokens = prompt, max_new_tokens
        self.temperature, self.top_k, self.top_p, self.seed = temperature, top_k, top_p, seed
        self.rows: list[list] = []

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        tokenizer, model = trainer.datamodule.tokenizer, pl_module.model
        prompt = prompt_ids(tokenizer, self.prompt)
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(self.seed)
        idx = torch.tensor([prompt[-model.context_length:]], device=device)
        out = model.generate(idx, self.max_new_tokens, self.temperature, self.top_k, self.top_p, generator=generator)
        text = tokenizer.decode(out[0].tolist())
        val_loss = trainer.callback_metrics.get("val/loss")
        val_loss = float(val_loss) if val_loss is not None else float("nan")
        self.write(trainer.global_step, val_loss, text)
        self.rows.append([trainer.global_step, val_loss, text])
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):  # a wandb table is immutable: log all rows so far
                logger.log_text(key="samples", columns=["step", "val_loss", "text"], data=self.rows)

    def write(self, step: int, val_loss: float, text: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"## after {step} steps (val/loss {val_loss:.4f})\n\n```text\n{text}\n```\n\n")
