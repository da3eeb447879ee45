"""Finetuning, in parts a newcomer reads apart:

- methods (gptexp.finetune.methods): what trains: full, LoRA, QLoRA;
- objectives (gptexp.finetune.objectives): what the loss is: next-token, instruction, preference (DPO), and
  reinforcement learning on checkable rewards (gptexp.finetune.grpo; the rewards: gptexp.finetune.rewards).

How instruction and chat data are written as tokens is gptexp.data.templates (training data and `sample mode=chat`
alike); how an adapter is saved, gptexp.weights.hf.write_lora.
"""

import copy

import torch.nn as nn

from gptexp.core.config import ConfigError
from gptexp.data.templates import end_of_answer
from gptexp.finetune import grpo, objectives, rewards
from gptexp.finetune.methods import FinetuneConfig, apply, merge, quantize_4bit

__all__ = ["FinetuneConfig", "apply", "build_objective", "merge", "quantize_4bit"]


def build_objective(config: FinetuneConfig, model: nn.Module, data_kind: str, tokenizer=None):
    """The objective finetune.objective names (auto: what the data holds), for `data_kind` (windows | examples |
    pairs: gptexp.data) and the data's `tokenizer`. A preference's (and a KL-penalised grpo's) reference is the model
    with its adapters disabled (LoRA), else a frozen copy of it as it is now, the starting weights."""
    wanted = config.objective if config.objective != "auto" else {"windows": "next_token", "examples": "instruction",
                                                                   "pairs": "preference"}[data_kind]
    fits = {"next_token": "windows", "instruction": "examples", "preference": "pairs", "grpo": "examples"}[wanted]
    if fits != data_kind:
        what = {"windows": "token windows of a corpus", "examples": "instruction examples (no pairs)",
                "pairs": "preference pairs"}[data_kind]
        need = {"next_token": "a text corpus (data=shakespeare, ...)", "instruction": "instruction data "
                "(data=instruct, data=alpaca_cleaned, ...)", "preference": "preference pairs: (prompt, chosen, "
                "rejected) records (data=ultrafeedback, data=stories_preferences, ...)",
                "grpo": "prompts to answer: instruction data (data=stories_instruct, data=instruct, ...)"}[wanted]
        raise ConfigError(f"finetune.objective={wanted} needs {need}, but the data holds {what}")
    if wanted == "next_token":
        return objectives.NextToken()
    if wanted == "instruction":
        return objectives.Instruction()
    if config.disable_dropout:  # the policy as the reference runs: deterministic log-probabilities (TRL's default)
        objectives.without_dropout(model)
    needs_reference = wanted == "preference" or config.beta > 0
    reference = None if hasattr(model, "disable_adapter") or not needs_reference else \
        copy.deepcopy(model).eval().requires_grad_(False)
    if wanted == "preference":
        return objectives.Preference(config.beta, config.label_smoothing, reference, config.rpo_alpha)
    return grpo.GRPO(config, rewards.build(config.rewards, config.reward_weights), tokenizer, end_of_answer(tokenizer),
                     reference)

