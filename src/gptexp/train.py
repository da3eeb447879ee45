"""The training recipe: compose the objects a Hydra config describes, then fit."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import WandbLogger
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write

from gptexp import checkpoints, data, finetune, models
from gptexp.callbacks.resume import GracefulStop, ResumeState
from gptexp.config import ConfigError, build_dataclass
from gptexp.module import LanguageModelModule, OptimConfig

log = logging.getLogger(__name__)
# Hydra's .hydra/ folder is in the run directory, where metrics.csv goes too: nothing is overwritten
warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")


# mistakes in what the user asked for: answered by one line naming the problem and the fix, not a traceback
USER_ERRORS = (ConfigError, checkpoints.CheckpointError, FileNotFoundError, NotADirectoryError, PermissionError)


def main(cfg: DictConfig) -> float | None:
    """`run`, for the command line: a user error ends the run with its message on stderr (exit status 2),
    and a run directory this run made is removed, so no partial output stays behind."""
    output_dir = Path(cfg.output_dir)
    made_here = all(p.name == ".hydra" or p.suffix == ".log" for p in output_dir.iterdir())
    relaunch_as_this_job()
    try:
        return run(cfg)
    except USER_ERRORS as error:
        if made_here:
            shutil.rmtree(output_dir, ignore_errors=True)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


# the variables Lightning's DDP launcher sets in the launching process, as they were before any job
DISTRIBUTED_ENV = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")}


def relaunch_as_this_job() -> None:
    """Lightning starts a run's other DDP processes by running sys.argv again with hydra.run.dir=<hydra.run.dir>.
    In a multirun job those describe the whole sweep and a directory outside it; make them this job's, and
    undo what the previous job's launch left in this process."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    hydra_cfg = HydraConfig.get()
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    for key, value in DISTRIBUTED_ENV.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run(cfg: DictConfig) -> float | None:
    """Train as `cfg` (conf/train.yaml composed with overrides) says; return the best val/loss."""
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path)  # fail before any work when it is wrong
    own = Path(cfg.output_dir) / "checkpoints" / "last.ckpt"
    if ckpt_path is None and own.is_file():  # this directory's run, started again (e.g. a requeued SLURM job)
        log.info("resuming from %s, this run directory's last checkpoint", own)
        ckpt_path = resolve_ckpt_path(str(own))
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
    datamodule.prepare_data()
    datamodule.setup("fit")  # data errors (too short for a window, bad shards) before any output is written
    module = LanguageModelModule(model, build_dataclass(OptimConfig, cfg.optim, "optim"), cfg.on_nonfinite_loss)
    resumed = checkpoint_of(ckpt_path, module)
    trainer = build_trainer(cfg, wandb_id=resumed.get("wandb_id"))
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


def checkpoint_of(ckpt_path: str | None, module: L.LightningModule) -> dict:
    """Check a checkpoint to resume from against the module (memory-mapped: cheap); its gptexp_resume record."""
    if ckpt_path is None:
        return {}
    checkpoint = checkpoints.load(ckpt_path, mmap=True)
    checkpoints.check_compatible(checkpoint.get("state_dict", {}), module.state_dict(), ckpt_path)
    return checkpoint.get("gptexp_resume", {})


def finish_wandb(trainer: L.Trainer) -> None:
    """End the wandb run: Lightning leaves it open, and the next job of a multirun in this process would
    otherwise log into it."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


def build_trainer(cfg: DictConfig, wandb_id: str | None = None) -> L.Trainer:
    """A Lightning Trainer from cfg.trainer, with the callbacks and loggers cfg.callbacks and cfg.logger list,
    atomic checkpoint writes, resumable RNG states and SIGTERM / Ctrl-C stops with a checkpoint.
    `wandb_id`: the wandb run a resumed run continues."""
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    steps = trainer_args.get("max_steps", -1)
    if not isinstance(steps, int) or steps <= 0:
        raise ConfigError(f"trainer.max_steps must be a positive number of optimizer steps, got {steps}")
    if isinstance(trainer_args.get("strategy"), dict):  # a strategy object with arguments (trainer=fsdp)
        trainer_args["strategy"] = instantiate(cfg.trainer.strategy, "trainer.strategy")
    batches = steps * trainer_args.get("accumulate_grad_batches", 1)
    if isinstance(trainer_args.get("val_check_interval"), int) and trainer_args["val_check_interval"] > batches:
        trainer_args["val_check_interval"] = batches  # a run shorter than one interval validates at its end
    callbacks = [instantiate(c, f"callbacks.{name}") for name, c in (cfg.get("callbacks") or {}).items() if c]
    callbacks += [ResumeState(), GracefulStop(str(Path(cfg.output_dir) / "checkpoints" / "last.ckpt"))]
    resume = {"id": wandb_id, "resume": "allow"} if wandb_id else {}
    loggers = [instantiate(c, f"logger.{name}", **(resume if "wandb" in c.get("_target_", "") else {}))
               for name, c in (cfg.get("logger") or {}).items() if c]
    # Lightning adds a checkpoint callback and a progress bar of its own unless told not to: only cfg.callbacks count
    trainer_args.setdefault("enable_checkpointing", any(isinstance(c, ModelCheckpoint) for c in callbacks))
    trainer_args.setdefault("enable_progress_bar", any(isinstance(c, ProgressBar) for c in callbacks))
    try:
        return L.Trainer(**trainer_args, callbacks=callbacks, logger=loggers or False,
                         default_root_dir=cfg.output_dir, plugins=[checkpoints.AtomicCheckpointIO()])
    except TypeError as error:
        raise ConfigError(f"trainer: {error}; trainer.* keys are lightning.Trainer arguments") from error


def instantiate(cfg: DictConfig, key: str, **kwargs):
    """hydra.utils.instantiate, with a wrong argument reported as the config key it came from."""
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except InstantiationException as error:
        raise ConfigError(f"{key}: {error.__cause__ or error}") from error


def resolve_ckpt_path(ckpt_path: str | None) -> str | None:
    """A checkpoint file, or a run directory meaning its checkpoints/last.ckpt."""
    if ckpt_path is None:
        return None
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                checkpoints.check_readable(candidate)
                return str(candidate)
        raise FileNotFoundError(f"ckpt_path={ckpt_path} is a directory without checkpoints/last.ckpt; "
                                f"pass a run directory (outputs/<date>/<time>) or a .ckpt file")
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist; pass a .ckpt file or a run directory "
                                f"(outputs/<date>/<time>) holding checkpoints/last.ckpt")
    checkpoints.check_readable(path)
    return str(path)
