"""The training recipe: compose the objects a Hydra config describes, then fit."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from gptexp import data, finetune, models
from gptexp.config import ConfigError, build_dataclass
from gptexp.module import LanguageModelModule, OptimConfig

log = logging.getLogger(__name__)
# Hydra's .hydra/ folder is in the run directory, where metrics.csv goes too: nothing is overwritten
warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")


def run(cfg: DictConfig) -> float | None:
    """Train as `cfg` (conf/train.yaml composed with overrides) says; return the best val/loss."""
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path)  # fail before any work when it is wrong
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    model_tokenizer = "char" if cfg.data.get("tokenizer") == "char" else models.tokenizer_spec(cfg.model)
    if model_tokenizer == "char" and any(cfg.model.get(key) for key in models.WEIGHTS_KEYS):
        raise ConfigError("pretrained weights need the tokenizer they were trained with, not characters; "
                          "use data=shakespeare rather than data=shakespeare_char, and leave model.tokenizer alone")
    source = data.load(cfg.data, model_tokenizer)
    model = models.build(cfg.model, vocab_size=source.tokenizer.vocab_size)
    log.info("model: %s, %.2fM parameters; tokenizer %s (%d tokens)", cfg.model.arch, model.num_parameters() / 1e6,
             source.tokenizer.name, source.tokenizer.vocab_size)
    model = finetune.apply(model, cfg.finetune)
    datamodule = data.build(source, model.context_length, seed=cfg.seed)
    module = LanguageModelModule(model, build_dataclass(OptimConfig, cfg.optim, "optim"))
    trainer = build_trainer(cfg)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        if cfg.validate_first and ckpt_path is None:  # where a finetune starts from, logged at step 0
            trainer.validate(module, datamodule=datamodule, verbose=False)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        finish_wandb(trainer)
    if trainer.is_global_zero:
        finetune.save(module.model, cfg.output_dir, merged=cfg.finetune.get("save_merged", False))
    best = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
    if best is None:
        best = trainer.callback_metrics.get("val/loss")
    return None if best is None else float(best)


def finish_wandb(trainer: L.Trainer) -> None:
    """End the wandb run: Lightning leaves it open, and the next job of a multirun in this process would
    otherwise log into it."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


def build_trainer(cfg: DictConfig) -> L.Trainer:
    """A Lightning Trainer from cfg.trainer, with the callbacks and loggers cfg.callbacks and cfg.logger list."""
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    steps = trainer_args.get("max_steps", -1)
    if not isinstance(steps, int) or steps <= 0:
        raise ConfigError(f"trainer.max_steps must be a positive number of optimizer steps, got {steps}")
    batches = steps * trainer_args.get("accumulate_grad_batches", 1)
    if isinstance(trainer_args.get("val_check_interval"), int) and trainer_args["val_check_interval"] > batches:
        trainer_args["val_check_interval"] = batches  # a run shorter than one interval validates at its end
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    # Lightning adds a checkpoint callback and a progress bar of its own unless told not to: only cfg.callbacks count
    trainer_args.setdefault("enable_checkpointing", any(isinstance(c, ModelCheckpoint) for c in callbacks))
    trainer_args.setdefault("enable_progress_bar", any(isinstance(c, ProgressBar) for c in callbacks))
    try:
        return L.Trainer(**trainer_args, callbacks=callbacks, logger=loggers or False,
                         default_root_dir=cfg.output_dir)
    except TypeError as error:
        raise ConfigError(f"trainer: {error}; trainer.* keys are lightning.Trainer arguments") from error


def resolve_ckpt_path(ckpt_path: str | None) -> str | None:
    """A checkpoint file, or a run directory meaning its checkpoints/last.ckpt."""
    if ckpt_path is None:
        return None
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                return str(candidate)
        raise FileNotFoundError(f"ckpt_path={ckpt_path} is a directory without checkpoints/last.ckpt; "
                                f"pass a run directory (outputs/<date>/<time>) or a .ckpt file")
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist; pass a .ckpt file or a run directory "
                                f"(outputs/<date>/<time>) holding checkpoints/last.ckpt")
    return str(path)
