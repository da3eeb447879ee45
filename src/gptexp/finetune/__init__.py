"""Finetuning, in parts a newcomer reads apart:

- methods (gptexp.finetune.methods): what trains: full, LoRA, QLoRA;
- objectives (gptexp.finetune.objectives): what the loss is: next-token, instruction, preference (DPO);
- templates (gptexp.finetune.templates): how instruction and chat data are written as tokens, and which of them
  train; the same code `sample mode=chat` talks through.
"""

from gptexp.finetune.methods import FinetuneConfig, apply, merge, quantize_4bit, save

__all__ = ["FinetuneConfig", "apply", "merge", "quantize_4bit", "save"]
