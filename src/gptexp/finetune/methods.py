"""Finetuning methods, what trains: `full` (every parameter) and `lora` through peft (base weights frozen,
only the low-rank adapters train), optionally on a 4-bit quantized base (QLoRA: the base in NF4 through
bitsandbytes, on CUDA or a CPU; gptexp.inference.nf4).

Adapters are saved in peft's format by gptexp.weights.hf.write_lora; since gptexp's parameter names are HF's, they
load into transformers models with `peft.PeftModel`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from gptexp.core.config import ConfigError, build_dataclass
from gptexp.inference import nf4
from gptexp.models import LanguageModel

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    method: str = "full"  # full | lora
    r: int = 8  # LoRA rank
    alpha: int = 16  # LoRA scale numerator: updates are scaled by alpha / r
    dropout: float = 0.05  # dropout on the LoRA branch's input
    target_modules: tuple[str, ...] | None = None  # module names that get adapters; null: the model's default
    quantize: str | None = None  # 4bit: QLoRA (the frozen base in NF4 through bitsandbytes)
    save_merged: bool = False  # also write the base with the adapter merged in, as a plain checkpoint
    # the objective (gptexp.finetune.objectives): what the loss is
    objective: str = "auto"  # auto (what the data holds) | next_token | instruction | preference | grpo
    beta: float = 0.1  # preference: the scale of the implicit reward, as TRL's DPO; grpo: the KL penalty's weight
    label_smoothing: float = 0.0  # preference: the assumed share of flipped labels (cDPO)
    rpo_alpha: float = 0.0  # preference: weight of the chosen answers' NLL per token beside DPO's loss (RPO); 0: DPO
    disable_dropout: bool = True  # preference: the policy without dropout too, as TRL's DPO (the reference never has)
    init_from: str | None = None  # start from this run's weights (its best checkpoint, a LoRA adapter merged in)
    # grpo (gptexp.finetune.grpo): rollouts, rewards, advantages and the clipped loss; conf/finetune/grpo.yaml says why
    num_generations: int = 8  # answers sampled per prompt (a group)
    max_new_tokens: int = 256  # the longest answer; one cut there has no EOS
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    rewards: dict | None = None  # {name: {_target_: module.function, ...its arguments}}
    reward_weights: dict | None = None  # {name: weight}; 1 for a reward not named
    scale_rewards: str = "batch"  # batch | group | none: what divides the advantages
    loss_type: str = "dapo"  # dapo | dr_grpo | grpo: how the tokens' losses add up
    num_iterations: int = 1  # μ: optimizer steps on each round of rollouts
    epsilon: float = 0.2  # the ratio's clip below, 1 - epsilon
    epsilon_high: float | None = None  # and above, 1 + epsilon_high (null: epsilon)
    drop_zero_std_groups: bool = False  # leave out groups whose rewards are all equal

    def __post_init__(self):
        if self.method not in ("full", "lora"):
            raise ValueError(f"method must be full or lora, got {self.method!r}")
        if self.r <= 0 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"need r > 0, alpha > 0 and dropout in [0, 1); got r={self.r}, alpha={self.alpha}, "
                             f"dropout={self.dropout}")
        if self.quantize not in (None, "4bit"):
            raise ValueError(f"quantize must be null or 4bit, got {self.quantize!r}")
        if self.quantize and self.method != "lora":
            raise ValueError("quantize=4bit trains LoRA adapters on a frozen quantized base: use finetune=lora")
        from gptexp.finetune.objectives import OBJECTIVES

        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.beta < 0 or (self.beta == 0 and self.objective == "preference") or not 0 <= self.label_smoothing < 0.5 \
                or self.rpo_alpha < 0:
            raise ValueError(f"need beta > 0 (grpo: >= 0), label_smoothing in [0, 0.5) and rpo_alpha >= 0; got "
                             f"beta={self.beta}, label_smoothing={self.label_smoothing}, rpo_alpha={self.rpo_alpha}")
        from gptexp.finetune.grpo import LOSS_TYPES, SCALE_REWARDS

        if self.loss_type not in LOSS_TYPES or self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)} and scale_rewards one of "
                             f"{', '.join(SCALE_REWARDS)}; got {self.loss_type!r}, {self.scale_rewards!r}")
        if self.num_generations < 2 or self.max_new_tokens < 1 or self.num_iterations < 1:
            raise ValueError(f"need num_generations >= 2 (a group to compare), max_new_tokens >= 1 and "
                             f"num_iterations >= 1; got {self.num_generations}, {self.max_new_tokens}, "
                             f"{self.num_iterations}")
        if not 0 < self.epsilon < 1 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise ValueError(f"need epsilon in (0, 1) and epsilon_high > 0; got {self.epsilon}, {self.epsilon_high}")
        from gptexp.inference.generation import check_sampling

        check_sampling(self.temperature, self.top_k, self.top_p)


def apply(model: LanguageModel, cfg: Mapping[str, Any]) -> nn.Module:
    """The model ready to train under conf/finetune/*.yaml: itself (full), or wrapped by peft (lora)."""
    config = build_dataclass(FinetuneConfig, cfg, "finetune")
    if config.method == "full":
        return model
    targets = list(config.target_modules or model.lora_targets)
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ConfigError(f"finetune.target_modules: {missing} match no linear layer of the model; "
                          f"its linear layers are {sorted(names)}")
    total = model.num_parameters()  # counted before NF4 packs two weights a byte
    if config.quantize:
        quantize_4bit(model)
    with nf4.quiet_import():
        from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets)
    peft_model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log.info("LoRA r=%d on %s%s: %d trainable parameters (%.2f%% of %d)", config.r, targets,
             " over an NF4 base (QLoRA)" if config.quantize else "", trainable, 100 * trainable / total, total)
    return peft_model


def quantize_4bit(model: LanguageModel) -> None:
    """QLoRA's base: every linear layer but the output head in NF4 (bitsandbytes), quantized on the GPU where
    there is one, else on the CPU."""
    nf4.quantize(model, "cuda" if torch.cuda.is_available() else "cpu", "finetune.quantize=4bit", training=True)


def merge(model: nn.Module) -> LanguageModel:
    """The base model with the LoRA update folded into its weights (W + alpha/r · B·A), adapters removed.
    Works on a copy: the adapter model stays usable."""
    import copy

    return copy.deepcopy(model).merge_and_unload()
