"""Finetuning objectives: what the loss of a batch is (gptexp.finetune.methods says which weights it trains).

- next_token: the micro-batch's mean cross-entropy over every target (pretraining; continuing a corpus);
- instruction: cross-entropy over the answers' tokens only (instruction and chat data, gptexp.data.instruct),
  summed and divided by the answer tokens of the whole optimizer step, across its micro-batches and processes:
  a step's gradient is then the same whether it is one batch of 8, 4 accumulated batches of 2 or 2 processes x 4,
  however long each answer is;
- preference: DPO (Rafailov et al., 2023) on (chosen, rejected) answers to one prompt: with log-probabilities
  summed over each answer's tokens, policy π and reference π_ref (the base with its adapters disabled, or a frozen
  copy of the starting weights), the reward of an answer is β (log π - log π_ref) and a pair's loss is
  -(1 - ε) log σ(r_chosen - r_rejected) - ε log σ(r_rejected - r_chosen) (ε: label_smoothing, cDPO's noisy labels),
  plus α times the chosen answer's negative log-likelihood per token (α: rpo_alpha, RPO, Pang et al. 2024: it keeps
  the chosen answers likely, where DPO alone lowers both), summed over the step's pairs and divided by their number;
- grpo: reinforcement learning on the rewards of the policy's own answers to instruction data's prompts
  (gptexp.finetune.grpo, with its rewards in gptexp.finetune.rewards).

Each objective returns what backward needs. Lightning divides it by the accumulated batches and DDP averages the
processes' gradients: `scale` (accumulated batches x processes) undoes both for the step-normalised objectives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptexp.inference.generation import evaluating


@dataclass
class StepLoss:
    loss: torch.Tensor  # what backward sees
    shown: torch.Tensor  # train/loss: this micro-batch's own mean
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def token_logps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, entropy: bool = False, temperature: float = 1.0):
    """(rows, T) log-probability of each target of y under `model` (0 where y is -1), its logits divided by
    `temperature` (the distribution tokens were sampled from); with `entropy`, also the entropy of that distribution
    at each position (no gradient)."""
    logits, _ = model(x)
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * (y != -1)
    if not entropy:
        return logp
    with torch.no_grad():
        return logp, -(logp_all.exp() * logp_all).sum(-1)


@torch.no_grad()
def reference_token_logps(reference: nn.Module | None, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                          temperature: float = 1.0) -> torch.Tensor:
    """token_logps under the reference π_ref, without dropout (in eval mode, as TRL's): `model` with its adapters
    disabled (reference None: LoRA), else the frozen copy `reference`, which takes the policy's device and dtype
    (trainer.precision=bf16-true makes the policy bf16 after the copy was made)."""
    if reference is None:
        with model.disable_adapter(), evaluating(model):
            return token_logps(model, x, y, temperature=temperature)
    weight = next(p for p in model.parameters() if p.is_floating_point())
    reference.to(device=x.device, dtype=weight.dtype)
    return token_logps(reference.eval(), x, y, temperature=temperature)


class NextToken:
    """Every target counts, averaged over the micro-batch's targets; batches are (x, y)."""

    name = "next_token"
    metric_names: tuple[str, ...] = ()

    def train(self, model: nn.Module, batch, scale: float) -> StepLoss:
        x, y = batch
        _, loss = model(x, y)
        return StepLoss(loss, loss)

    def validate(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(mean loss, its weight, metrics) of a validation batch."""
        x, y = batch
        _, loss = model(x, y, return_logits=False)  # bounded memory whatever the vocabulary
        return loss, (y != -1).sum(), {}


class Instruction(NextToken):
    """The answers' tokens only (the batch's targets), normalised by the optimizer step's answer tokens."""

    name = "instruction"

    def train(self, model: nn.Module, batch: dict, scale: float) -> StepLoss:
        y = batch["y"]
        _, mean = model(batch["x"], y, documents=batch.get("documents"))
        summed = mean * (y != -1).sum()
        return StepLoss(summed * scale / batch["step_tokens"], mean)

    def validate(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        y = batch["y"]
        _, loss = model(batch["x"], y, return_logits=False, documents=batch.get("documents"))
        return loss, (y != -1).sum(), {}


class Preference:
    """DPO on batches whose first half of rows are the chosen answers and second half the rejected ones."""

    name = "preference"
    metric_names = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "nll/chosen")

    def __init__(self, beta: float, label_smoothing: float, reference: nn.Module | None = None,
                 rpo_alpha: float = 0.0):
        self.beta, self.label_smoothing, self.rpo_alpha = beta, label_smoothing, rpo_alpha
        self.reference = reference  # None: the policy itself with its adapters disabled (LoRA)

    @staticmethod
    def logps(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(rows,) log-probability of each row's targets (its answer), summed over them."""
        return token_logps(model, x, y).sum(-1)

    def reference_logps(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return reference_token_logps(self.reference, model, x, y).sum(-1)

    def losses(self, policy: torch.Tensor, reference: torch.Tensor,
               tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Each pair's loss and rewards from (2P,) log-probabilities and answer token counts, chosen first."""
        chosen, rejected = (self.beta * (p - r) for p, r in zip(policy.chunk(2), reference.chunk(2)))
        margin = chosen - rejected
        losses = -(1 - self.label_smoothing) * F.logsigmoid(margin) - self.label_smoothing * F.logsigmoid(-margin)
        nll = -policy.chunk(2)[0] / tokens.chunk(2)[0]  # the chosen answers', per token
        if self.rpo_alpha:
            losses = losses + self.rpo_alpha * nll
        metrics = {"rewards/chosen": chosen, "rewards/rejected": rejected,
                   "rewards/accuracies": (chosen > rejected).float(), "rewards/margins": margin, "nll/chosen": nll}
        return losses, {k: v.detach() for k, v in metrics.items()}

    def train(self, model: nn.Module, batch: dict, scale: float) -> StepLoss:
        x, y = batch["x"], batch["y"]
        losses, metrics = self.losses(self.logps(model, x, y), self.reference_logps(model, x, y), (y != -1).sum(-1))
        return StepLoss(losses.sum() * scale / batch["step_pairs"], losses.mean(),
                        {k: v.mean() for k, v in metrics.items()})

    def validate(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        x, y = batch["x"], batch["y"]
        losses, metrics = self.losses(self.logps(model, x, y), self.reference_logps(model, x, y), (y != -1).sum(-1))
        return losses.mean(), torch.tensor(len(losses)), {k: v.mean() for k, v in metrics.items()}


OBJECTIVES = ("auto", "next_token", "instruction", "preference", "grpo")  # grpo: gptexp.finetune.grpo


def without_dropout(model: nn.Module) -> None:
    """Every dropout of `model` set to 0: its nn.Dropout layers (LoRA's too) and the attention's dropout rate."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, "dropout", None), float):  # GPT-2's attention passes it to SDPA
            module.dropout = 0.0
