"""Train or finetune a language model: python train.py [group=option ...] [key=value ...], or python -m gptexp
train ...: compose the objects a Hydra config describes, then fit."""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf, read_write

from gptexp import data, finetune
from gptexp.commands.cli import Fault, answered_errors, run_command
from gptexp.core.config import CONF_DIR, ConfigError, build_dataclass, plain
from gptexp.core.run_lock import secondary_rank
from gptexp.core.safe_load import trusting
from gptexp.core.writing import WriteError
from gptexp.data.tokenizers import tokenizer_state, vocabulary
from gptexp.training import precision
from gptexp.training.callbacks.history import RunHistory, carry_over
from gptexp.training.callbacks.resume import ResumePoint, ResumeState
from gptexp.training.checkpoint_io import AtomicCheckpointIO
from gptexp.training.module import LanguageModelModule
from gptexp.training.optim import OptimConfig
from gptexp.weights import checkpoints, hf, load_source, pretrained

log = logging.getLogger(__name__)


def main(cfg: DictConfig) -> float | None:
    """`run`, for the command line: bad input ends the run with one line on stderr (exit status 2), and a
    run directory this run made is removed; a write that fails (a full disk, a vanished directory) ends it
    with one line naming the file and the last intact checkpoint (exit status 1). See gptexp.commands.cli."""
    with answered_errors(cfg.output_dir):
        relaunch_as_this_job()
        try:
            with trusting(cfg.trust_checkpoint):  # every checkpoint read below: resume, Lightning's restore, weights
                return run(cfg)
        except WriteError as error:
            raise Fault(f"{error}; {intact_checkpoint_note(Path(cfg.output_dir) / 'checkpoints')}") from error


def intact_checkpoint_note(directory: Path) -> str:
    """Where a failed run can resume from: the furthest checkpoint in `directory` that loads."""
    found = checkpoints.last_intact(directory) if directory.is_dir() else None
    if found is None:
        return "no checkpoint of this run is left to resume from"
    step, path = found
    return (f"the last intact checkpoint is step {step}, {path}: once the cause is fixed, the same command "
            f"resumes from it")


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
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise ConfigError(f"seed must be an integer, got {cfg.seed!r}")
    ckpt_path = checkpoints.resolve_ckpt_path(cfg.ckpt_path)  # fail before any work when it is wrong
    if ckpt_path is None:  # this directory's run, started again (e.g. a requeued SLURM job)
        ckpt_path = own_checkpoint(Path(cfg.output_dir))
    # memory-mapped (cheap), weights-only, before any other reader sees the file (Lightning's FSDP restore
    # unpickles in full): a file asking for more is refused here
    resumed = checkpoints.load(ckpt_path, mmap=True) if ckpt_path else {}
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    char = cfg.data.get("tokenizer") == "char"
    location = None if char else pretrained.weights_location(cfg.model)  # model.pretrained / model.checkpoint
    model_tokenizer = "char" if char else pretrained.tokenizer(cfg.model, location)
    if model_tokenizer == "char" and any(cfg.model.get(key) for key in pretrained.WEIGHTS_KEYS):
        raise ConfigError("pretrained weights need the tokenizer they were trained with, not characters; "
                          "use data=shakespeare rather than data=shakespeare_char, and leave model.tokenizer alone")
    start = starting_run(cfg)  # finetune.init_from: an earlier run's model, tokenizer and template
    source = data.load(cfg.data, model_tokenizer, template=starting_template(cfg, start))
    if start is not None:
        model = start.model.train()
        if vocabulary(start.tokenizer) != vocabulary(source.tokenizer):  # the ids mean the same, whatever file
            raise ConfigError(f"finetune.init_from={cfg.finetune.init_from} was trained with the tokenizer "
                              f"{start.tokenizer.name}, the data is tokenized with {source.tokenizer.name}; set "
                              f"model=<that run's model> (model.tokenizer) to match")
    else:
        model = pretrained.build(cfg.model, source.tokenizer.vocab_size, location)
    arch = cfg.model.arch if start is None else type(model).__name__.lower()  # gpt2 | llama
    log.info("model: %s, %.2fM parameters; tokenizer %s (%d tokens)", arch, model.num_parameters() / 1e6,
             source.tokenizer.name, source.tokenizer.vocab_size)
    model = finetune.apply(model, cfg.finetune)
    finetune_config = build_dataclass(finetune.FinetuneConfig, cfg.finetune, "finetune")
    objective = finetune.build_objective(finetune_config, model, source.kind, source.tokenizer)
    if source.kind != "windows":
        log.info("objective: %s, on %s data in template %s", objective.name, source.config.format if
                 source.config.format != "auto" else source.tokens.kind, source.template)
    datamodule = data.build(source, model.context_length, seed=cfg.seed,
                            rounds=finetune_config.num_iterations if objective.name == "grpo" else None)
    datamodule.prepare_data()
    datamodule.setup("fit")  # data errors (too short for a window, bad shards) before any output is written
    optim = optimizer_config(cfg)
    log.info("optimizer: %s", "Muon for the hidden matrices, AdamW for the rest" if optim.name == "muon" else "AdamW")
    module = LanguageModelModule(model, optim, cfg.on_nonfinite_loss, tokenizer_state(source.tokenizer),
                                 objective=objective, template=source.template, system=source.system)
    if ckpt_path:
        checkpoints.check_compatible(resumed.get("state_dict", {}), module.state_dict(), ckpt_path)
    if not secondary_rank():  # rank 0 writes the history, and holds the directory's lock
        if partial := checkpoints.remove_partial_writes(Path(cfg.output_dir) / "checkpoints"):
            log.info("removed %d partial checkpoint file(s) left by a killed run", partial)
        kept = carry_over(ckpt_path, resumed, cfg.output_dir)
        if ckpt_path:
            log.info("=== resumed at step %d from %s: %s ===", resumed.get("global_step", 0), ckpt_path, kept)
    trainer = build_trainer(cfg, resumed.get("gptexp_resume", {}))
    processes = trainer.num_devices * trainer.num_nodes
    if objective.name == "grpo":
        batch = (source.config.batch_size, finetune_config.num_generations, processes, trainer.accumulate_grad_batches)
        log.info("batch: %d prompts x %d answers x %d processes x %d accumulated = %s answers of at most %d tokens "
                 "per optimizer step", *batch, f"{math.prod(batch):,}", finetune_config.max_new_tokens)
    else:
        batch = (source.config.batch_size, datamodule.seq_len, processes, trainer.accumulate_grad_batches)
        log.info("batch: %d windows x %d tokens x %d processes x %d accumulated = %s tokens per optimizer step",
                 *batch, f"{math.prod(batch):,}")
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        if cfg.validate_first and ckpt_path is None:  # where a finetune starts from, logged at step 0
            trainer.validate(module, datamodule=datamodule, verbose=False)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        finish_wandb(trainer)
    if trainer.is_global_zero:
        hf.write_lora(module.model, cfg.output_dir, merged=cfg.finetune.get("save_merged", False))
    best = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
    if best is None:
        best = trainer.callback_metrics.get("val/loss")
    return None if best is None else float(best)


def starting_run(cfg: DictConfig):
    """The run finetune.init_from names (its best checkpoint; a LoRA adapter merged in), or None."""
    if OmegaConf.is_missing(cfg.finetune, "init_from"):
        raise ConfigError("finetune.init_from is required by this recipe: add finetune.init_from=<the run to start from>")
    init_from = cfg.finetune.get("init_from")
    if not init_from:
        return None
    start = load_source(str(init_from), "best", cfg.trust_checkpoint, key="finetune.init_from")
    log.info("starting from %s", start.description)
    return start


def starting_template(cfg: DictConfig, start) -> str | None:
    """The template the starting run was trained in, which its instruction data is written in again. A data.template
    typed on the command line that disagrees with it is refused; one that a data preset sets gives way, logged."""
    chosen = cfg.data.get("template")
    if start is None or not start.template or not chosen or chosen == start.template:
        return start.template if start else None
    if typed("data.template"):
        raise ConfigError(f"data.template={chosen} disagrees with finetune.init_from={cfg.finetune.init_from}, "
                          f"trained in template {start.template}: leave data.template unset to go on in "
                          f"{start.template}, or start from a run trained in {chosen}")
    log.warning("data.template=%s (the data preset's) gives way to %s, the template finetune.init_from was trained in",
                chosen, start.template)
    return start.template


def typed(key: str) -> bool:
    """Whether `key` was set on the command line (not by a config group or a recipe)."""
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    return any(o.lstrip("+~").split("=", 1)[0] == key for o in overrides)


def optimizer_config(cfg: DictConfig) -> OptimConfig:
    """cfg.optim, checked; an optimizer picked on the command line (optim=adamw) wins over the one a model's
    recipe names (optim.name), as every other command-line choice does."""
    values = plain(cfg.optim)
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    picked = [o.split("=", 1)[1] for o in overrides if o.startswith("optim=")]
    if picked and not typed("optim.name"):
        values["name"] = picked[-1]
    return build_dataclass(OptimConfig, values, "optim")


def own_checkpoint(run_dir: Path) -> str | None:
    """The furthest state a run directory holds: its checkpoints/last.ckpt, or the checkpoint Lightning's
    SLURM support writes at SIGUSR1 (hpc_ckpt_<n>.ckpt) when that one is further."""
    candidates = [path for path in (run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt"))
                  if path.is_file()]
    steps = {path: checkpoints.load(path, mmap=True).get("global_step", 0) for path in candidates}  # corrupt: refused
    return str(max(steps, key=steps.get)) if steps else None


def finish_wandb(trainer: L.Trainer) -> None:
    """End the wandb run: Lightning leaves it open, and the next job of a multirun in this process would
    otherwise log into it."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


def build_trainer(cfg: DictConfig, resumed: dict | None = None) -> L.Trainer:
    """A Lightning Trainer from cfg.trainer, with the callbacks and loggers cfg.callbacks and cfg.logger list,
    atomic checkpoint writes, resumable RNG states and SIGTERM / Ctrl-C stops with a checkpoint.
    `resumed`: what a resumed run's checkpoint recorded (callbacks.resume.ResumeState): the wandb and MLflow runs
    it continues."""
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    steps = trainer_args.get("max_steps", -1)
    if not isinstance(steps, int) or steps <= 0:
        raise ConfigError(f"trainer.max_steps must be a positive number of optimizer steps, got {steps}")
    trainer_args["precision"], why = precision.resolve(trainer_args.get("precision", "auto"),
                                                       trainer_args.get("accelerator", "auto"))
    log.info("precision: %s (%s)", trainer_args["precision"], why)
    if isinstance(trainer_args.get("strategy"), dict):  # a strategy object with arguments (trainer=fsdp)
        trainer_args["strategy"] = instantiate(cfg.trainer.strategy, "trainer.strategy")
    batches = steps * trainer_args.get("accumulate_grad_batches", 1)
    if isinstance(trainer_args.get("val_check_interval"), int) and trainer_args["val_check_interval"] > batches:
        trainer_args["val_check_interval"] = batches  # a run shorter than one interval validates at its end
    callbacks = [instantiate(c, f"callbacks.{name}") for name, c in (cfg.get("callbacks") or {}).items() if c]
    if not any(isinstance(c, ResumePoint) for c in callbacks):  # SIGTERM / Ctrl-C stop with a checkpoint, always
        callbacks.append(ResumePoint(str(Path(cfg.output_dir) / "checkpoints" / "last.ckpt"), every_n_steps=None))
    callbacks += [ResumeState(), RunHistory()]
    resumed = resumed or {}
    continued = {"wandb": {"id": resumed["wandb_id"], "resume": "allow"} if resumed.get("wandb_id") else {},
                 "mlflow": {"run_id": resumed["mlflow_run_id"]} if resumed.get("mlflow_run_id") else {}}
    loggers = [instantiate(c, f"logger.{name}", **continued.get(name, {}))
               for name, c in (cfg.get("logger") or {}).items() if c]
    # Lightning adds a checkpoint callback and a progress bar of its own unless told not to: only cfg.callbacks count
    trainer_args.setdefault("enable_checkpointing", any(isinstance(c, ModelCheckpoint) for c in callbacks))
    trainer_args.setdefault("enable_progress_bar", any(isinstance(c, ProgressBar) for c in callbacks))
    try:
        return L.Trainer(**trainer_args, callbacks=callbacks, logger=loggers or False,
                         default_root_dir=cfg.output_dir, plugins=[AtomicCheckpointIO()])
    except TypeError as error:
        raise ConfigError(f"trainer: {error}; trainer.* keys are lightning.Trainer arguments") from error


def instantiate(cfg: DictConfig, key: str, **kwargs):
    """hydra.utils.instantiate, with a wrong argument reported as the config key it came from (once: a message that
    names a key under it already stands as it is)."""
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__ or error
        raise ConfigError(str(cause) if str(cause).startswith(key) else f"{key}: {cause}") from cause


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def app(cfg: DictConfig) -> float | None:
    return main(cfg)


if __name__ == "__main__":
    run_command(app)
