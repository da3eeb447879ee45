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


def wandb_logger(save_dir: str, project: str = "gptexp", mode: str = "auto", **kwargs) -> WandbLogger:
    """A WandbLogger writing under `save_dir/wandb`. mode=auto: WANDB_MODE if set, else online only
    when an API key is configured, otherwise offline (sync later with `wandb sync <run folder>`)."""
    if mode not in WANDB_MODES:
        raise ValueError(f"logger.wandb.mode must be one of {', '.join(WANDB_MODES)}, got {mode!r}")
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_api_key_configured() else "offline")
    os.makedirs(save_dir, exist_ok=True)
    return WandbLogger(project=project, save_dir=save_dir, offline=mode == "offline", mode=mode, **kwargs)
