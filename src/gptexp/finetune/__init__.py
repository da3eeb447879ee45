"""Finetuning, in parts a newcomer reads apart:

- methods (gptexp.finetune.methods): what trains: full, LoRA, QLoRA;
- objectives (gptexp.finetune.objectives): what the loss is: next-token, instruction, preference (DPO).

How instruction and chat data are written as tokens is gptexp.data.templates (training data and `sample mode=chat`
alike); how an adapter is saved, gptexp.weights.hf.write_lora.
"""

from gptexp.finetune.methods import FinetuneConfig, apply, merge, quantize_4bit

__all__ = ["FinetuneConfig", "apply", "merge", "quantize_4bit"]
