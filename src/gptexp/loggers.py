"""Experiment loggers: wandb that never prompts and never waits for a network it does not have."""

from __future__ import annotations

import netrc
import os

from lightning.pytorch.loggers import WandbLogger

WANDB_MODES = ("auto", "online", "offline", "disabled")


def wandb_api_key_configured() -> bool:
    """True when wandb has credentials: WANDB_API_KEY, or an api.wandb.ai entry in ~/.netrc (`wandb login`)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def sweep_job() -> tuple[str, str] | None:
    """(sweep directory, this job's overrides) when Hydra runs a multirun, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hydra = HydraConfig.get()
    return hydra.sweep.dir, f"{hydra.job.num}: {hydra.job.override_dirname or 'defaults'}"


def wandb_logger(save_dir: str, project: str = "gptexp", mode: str = "auto", group: str | None = None,
                 name: str | None = None, **kwargs) -> WandbLogger:
    """A WandbLogger writing under `save_dir/wandb`. mode=auto: WANDB_MODE if set, else online only
    when an API key is configured, otherwise offline (sync later with `wandb sync <run folder>`).
    In a Hydra multirun each job is one run, grouped by the sweep directory and named by its overrides,
    unless group / name are given."""
    if mode not in WANDB_MODES:
        raise ValueError(f"logger.wandb.mode must be one of {', '.join(WANDB_MODES)}, got {mode!r}")
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_api_key_configured() else "offline")
    job = sweep_job()
    if job:
        group, name = group or job[0], name or job[1]
    os.makedirs(save_dir, exist_ok=True)
    return WandbLogger(project=project, save_dir=save_dir, offline=mode == "offline", mode=mode, group=group,
                       name=name, **kwargs)
