"""GRPO: reinforcement learning on rewards a program checks (Shao et al. 2024, DeepSeekMath), with the corrections
of DAPO (Yu et al. 2025) and Dr. GRPO (Liu et al. 2025).

Rollouts. Once per round of num_iterations optimizer steps (μ), at the round's first micro-batch, the policy answers
each of the round's prompts G times (num_generations; gptexp.data.prompt_batches): one prefill per prompt, continued
G ways with the KV cache, sampled at `temperature` (top_k, top_p) for at most max_new_tokens, each answer ending at
its first end token (EOS; BOS, where a base model starts its next document). The rewards (gptexp.finetune.rewards)
score each answer; their weighted sum r is its reward.

Advantages: A = r - mean(r of its group) (its prompt's G answers), divided by the group's standard deviation
(scale_rewards=group, GRPO's and TRL's), by the standard deviation of the whole step's rewards (batch: every
prompt's answers scaled alike, so none counts more for having near-equal rewards, which Dr. GRPO shows biases the
original; the advantages' scale still does not depend on the rewards'), or not at all (none: Dr. GRPO, nanochat).
A group whose rewards are all equal has A = 0: it teaches nothing (drop_zero_std_groups leaves it out entirely).

Loss, per answer token t: -min(ρ_t A, clip(ρ_t, 1 - ε, 1 + ε_high) A) + β k3_t, where ρ_t = π(t) / π_old(t) (every
π here is the distribution sampled from: the logits divided by the temperature, as in TRL; π_old:
the policy that sampled, so ρ = 1 exactly in a round's first step) and k3_t = exp(d) - d - 1, d = log π_ref(t) -
log π(t) (Schulman's k3 estimator of KL(π ‖ π_ref); π_ref as DPO's: the adapters disabled, or a frozen copy of the
starting weights; β = 0: no reference pass at all). loss_type says how the tokens' terms add up, over the whole
optimizer step (all its micro-batches and processes, so that the step's gradient is the same however it is split):
- dapo: their sum divided by the step's answer tokens (every token weighs alike: DAPO's token-level loss);
- dr_grpo: their sum divided by the step's answers x max_new_tokens (a constant: no length bias; Dr. GRPO);
- grpo: each answer's mean over its tokens, averaged over the step's answers (the original: a long answer's tokens
  weigh less, which Dr. GRPO shows lengthens wrong answers).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist
import torch.nn as nn

from gptexp.data.tokenizers import end_of_text_ids
from gptexp.finetune import rewards as reward_functions
from gptexp.finetune.objectives import Instruction, StepLoss, reference_token_logps, token_logps
from gptexp.inference.generation import decode

LOSS_TYPES = ("dapo", "dr_grpo", "grpo")
SCALE_REWARDS = ("batch", "group", "none")


@dataclass
class Rollouts:
    """A round's answers of this process, G rows per prompt, prompt by prompt in the round's micro-batch order."""

    round: int
    x: torch.Tensor  # (N, W): prompt and answer but the answer's last token, right-padded with 0
    y: torch.Tensor  # (N, W): each answer token at the position that predicts it, -1 elsewhere
    advantages: torch.Tensor  # (N,)
    kept: torch.Tensor  # (N,) bool: rows that train (a dropped group's do not)
    step_tokens: float  # the kept answer tokens of the whole step, every process's
    step_rows: float  # the kept answers of the whole step, every process's
    old: torch.Tensor | None = None  # (N, W) log π_old of each answer token (μ > 1)
    reference: torch.Tensor | None = None  # (N, W) log π_ref of each answer token (β > 0)
    metrics: dict[str, float] = field(default_factory=dict)

    def rows(self, micro: int, micro_batches: int) -> tuple[slice, int]:
        """Micro-batch `micro`'s rows, and the width its longest row needs."""
        n = len(self.x) // micro_batches
        part = slice(micro * n, (micro + 1) * n)
        width = int((self.y[part] != -1).any(0).nonzero().max()) + 1 if (self.y[part] != -1).any() else 1
        return part, width

    def to(self, device) -> Rollouts:
        return Rollouts(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.state().items()})

    def state(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def summed(values: list[float], device) -> list[float]:
    """`values` summed over every process (themselves without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


class GRPO:
    """The objective of finetune=grpo (module docstring); batches are rounds of prompts (gptexp.data.prompt_batches);
    validation scores the dataset's answers (val/loss, as an instruction run's) and the policy's greedy answers
    (val/reward, and each reward's mean)."""

    name = "grpo"

    def __init__(self, config, rewards: list[reward_functions.Reward], tokenizer, eos: int,
                 reference: nn.Module | None = None):
        self.config, self.rewards, self.tokenizer, self.eos = config, rewards, tokenizer, eos
        self.ends = end_of_text_ids(tokenizer) | {eos}
        self.reference = reference  # None: the policy with its adapters disabled (LoRA); unused at β = 0
        self.epsilon_high = config.epsilon if config.epsilon_high is None else config.epsilon_high
        # log-probabilities of the distribution the answers were sampled from (as TRL's); greedy: the model's own
        self.temperature = config.temperature or 1.0
        self.rollouts: Rollouts | None = None
        self.rollout_seconds = 0.0  # spent rolling out, for the timing callback's rollout phase
        self.metric_names = ("reward", *(f"rewards/{r.name}" for r in rewards), "completions/mean_length",
                             "completions/eos")

    # --- rollouts ------------------------------------------------------------------------------------------

    def answer(self, model: nn.Module, prompts: list[list[int]], fan_out: int, temperature: float,
               generator: torch.Generator | None, room: int) -> list[tuple[list[int], bool]]:
        """fan_out answers to each prompt, prompt by prompt: (token ids, the last one an end token where the
        answer has one; whether that token is EOS)."""
        device = next(model.parameters()).device
        width = max(map(len, prompts))
        idx = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
        pad = torch.tensor([width - len(p) for p in prompts], device=device)
        steps = decode(model, idx, min(self.config.max_new_tokens, room - width), temperature, self.config.top_k,
                       self.config.top_p, generator=generator, pad=pad if pad.any() else None, fan_out=fan_out,
                       ends=self.ends)  # a finished answer leaves the batch: the rest decode as a smaller one
        answers, done = [[] for _ in range(len(prompts) * fan_out)], [False] * (len(prompts) * fan_out)
        for column in steps:
            for row, token in enumerate(column[:, 0].tolist()):
                if not done[row]:
                    answers[row].append(token)
                    done[row] = token in self.ends
        return [(ids, bool(ids) and ids[-1] == self.eos) for ids in answers]

    def score(self, requests: list[str], references: list[str], answers: list[tuple[list[int], bool]]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rewards (N, R), NaN where one abstained; their weighted sum (N,), abstentions left out)."""
        texts = [self.tokenizer.decode(ids[:-1] if ids and ids[-1] in self.ends else ids) for ids, _ in answers]
        arguments = {"prompts": requests, "completions": texts, "ended": [e for _, e in answers],
                     "references": references, "completion_ids": [ids for ids, _ in answers]}
        scores = [reward_functions.score(r, len(texts), **arguments) for r in self.rewards]
        values = torch.tensor([[math.nan if v is None else v for v in column] for column in scores],
                              dtype=torch.float64).T
        weights = torch.tensor([r.weight for r in self.rewards], dtype=torch.float64)
        return values, (values * weights).nansum(-1)

    @torch.no_grad()
    def roll_out(self, model: nn.Module, batch: dict, room: int) -> Rollouts:
        """The round's answers to `batch`'s prompts, sampled from a generator seeded by the round, scored."""
        started = time.perf_counter()
        device = next(model.parameters()).device
        generator = torch.Generator(device).manual_seed(batch["rollout_seed"])
        answers = self.answer(model, batch["prompts"], self.config.num_generations, self.config.temperature,
                              generator, room)
        rollouts = self.scored(model, batch, answers, time.perf_counter() - started)
        self.rollout_seconds += time.perf_counter() - started
        return rollouts

    @torch.no_grad()
    def scored(self, model: nn.Module, batch: dict, answers: list[tuple[list[int], bool]],
               rollout_seconds: float = math.nan) -> Rollouts:
        """Rollouts of `answers` (G per prompt of `batch`, prompt by prompt): rewards, advantages, the step's
        totals over every process, and π_old's and π_ref's log-probabilities where they are needed."""
        c, G, T = self.config, self.config.num_generations, self.temperature
        device = next(model.parameters()).device
        repeat = lambda items: [item for item in items for _ in range(G)]  # noqa: E731
        values, reward = self.score(repeat(batch["requests"]), repeat(batch["references"]), answers)
        groups = reward.view(-1, G)
        advantages = groups - groups.mean(-1, keepdim=True)
        group_std = groups.std(-1, keepdim=True) if G > 1 else torch.zeros_like(groups[:, :1])
        zero_std = torch.isclose(group_std, torch.zeros_like(group_std)).squeeze(-1)
        if c.scale_rewards == "group":
            advantages = advantages / (group_std + 1e-4)
        elif c.scale_rewards == "batch":  # the standard deviation of every reward of the step, all processes'
            n, total, squares = summed([reward.numel(), reward.sum().item(), (reward ** 2).sum().item()], device)
            std = math.sqrt(max(0.0, squares - total ** 2 / n) / max(1.0, n - 1))
            advantages = advantages / (std + 1e-4)
        kept = ~zero_std.repeat_interleave(G) if c.drop_zero_std_groups else torch.ones(len(answers), dtype=torch.bool)

        prompts = repeat(batch["prompts"])
        width = max(len(p) + len(a) for p, (a, _) in zip(prompts, answers)) - 1
        x = torch.zeros(len(answers), width, dtype=torch.long)
        y = torch.full((len(answers), width), -1, dtype=torch.long)
        for row, (prompt, (ids, _)) in enumerate(zip(prompts, answers)):
            whole = torch.tensor(prompt + ids)
            x[row, :len(whole) - 1] = whole[:-1]
            y[row, len(prompt) - 1:len(whole) - 1] = torch.tensor(ids)
        lengths = (y != -1).sum(-1)
        step_tokens, step_rows, zero_groups, groups_total = summed(
            [float(lengths[kept].sum()), float(kept.sum()), float(zero_std.sum()), float(len(zero_std))], device)
        rollouts = Rollouts(batch["round"], x.to(device), y.to(device), advantages.flatten().float().to(device),
                            kept.to(device), step_tokens, step_rows)
        micro_batches = batch["micro_batches"]
        if c.num_iterations > 1:  # π_old: the policy that sampled, before the round's updates
            rollouts.old = self.per_micro_batch(lambda x_, y_: token_logps(model, x_, y_, temperature=T), rollouts,
                                                micro_batches)
        if c.beta > 0:
            rollouts.reference = self.per_micro_batch(
                lambda x_, y_: reference_token_logps(self.reference, model, x_, y_, T), rollouts, micro_batches)
        ended = [e for _, e in answers]
        rollouts.metrics = {
            "reward": reward.mean().item(), "reward_std": reward.std().item() if len(reward) > 1 else 0.0,
            "frac_reward_zero_std": zero_groups / groups_total,
            "completions/mean_length": lengths.float().mean().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": sum(not ids or ids[-1] not in self.ends for ids, _ in answers) / len(answers),
            "completions/eos": sum(ended) / len(ended),
            "rollout/tokens_per_sec": lengths.sum().item() / max(rollout_seconds, 1e-9),
            **{f"rewards/{r.name}/{stat}": value for i, r in enumerate(self.rewards)
               for stat, value in self.statistics(values[:, i]).items()}}
        return rollouts

    @staticmethod
    def statistics(values: torch.Tensor) -> dict[str, float]:
        given = values[~values.isnan()]
        if not len(given):
            return {}
        return {"mean": given.mean().item(), "std": given.std().item() if len(given) > 1 else 0.0}

    @staticmethod
    def per_micro_batch(logps, rollouts: Rollouts, micro_batches: int) -> torch.Tensor:
        """logps(x, y) over the rollouts a micro-batch at a time (the memory of one), as (N, W)."""
        out = torch.zeros(rollouts.y.shape, dtype=torch.float32, device=rollouts.y.device)
        for micro in range(micro_batches):
            part, width = rollouts.rows(micro, micro_batches)
            out[part, :width] = logps(rollouts.x[part, :width], rollouts.y[part, :width]).float()
        return out

    # --- the loss ------------------------------------------------------------------------------------------

    def losses(self, logp: torch.Tensor, old: torch.Tensor, reference: torch.Tensor | None, advantages: torch.Tensor,
               mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Each token's loss (rows, T) from its log-probabilities under the policy, π_old and π_ref, and the rows'
        advantages; and the tokens' clip share, KL and entropy-free metrics (means over `mask`)."""
        ratio = torch.exp(logp - old)
        A = advantages[:, None]
        clipped = ratio.clamp(1 - self.config.epsilon, 1 + self.epsilon_high)
        per_token = -torch.min(ratio * A, clipped * A)
        tokens = mask.sum().clamp(min=1)
        metrics = {}
        with torch.no_grad():
            region = ((ratio < 1 - self.config.epsilon) & (A < 0)) | ((ratio > 1 + self.epsilon_high) & (A > 0))
            metrics["clip_ratio"] = (region & mask).sum() / tokens
        if reference is not None and self.config.beta > 0:
            d = reference - logp
            kl = torch.exp(d) - d - 1
            per_token = per_token + self.config.beta * kl
            metrics["kl"] = (kl.detach() * mask).sum() / tokens
        return per_token, metrics

    def aggregate(self, per_token: torch.Tensor, mask: torch.Tensor, rows: float, tokens: float) -> torch.Tensor:
        """The tokens' terms added up as loss_type says, divided by `rows` answers or `tokens` answer tokens."""
        masked = per_token * mask
        if self.config.loss_type == "grpo":
            return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / max(rows, 1.0)
        if self.config.loss_type == "dr_grpo":
            return masked.sum() / max(rows * self.config.max_new_tokens, 1.0)
        return masked.sum() / max(tokens, 1.0)

    def train(self, model: nn.Module, batch: dict, scale: float) -> StepLoss:
        if self.rollouts is None or self.rollouts.round != batch["round"]:
            self.rollouts = self.roll_out(model, batch, model.context_length)
        r = self.rollouts
        device = next(model.parameters()).device
        if r.x.device != device:  # loaded from a checkpoint
            self.rollouts = r = r.to(device)
        part, width = r.rows(batch["micro"], batch["micro_batches"])
        x, y = r.x[part, :width], r.y[part, :width]
        mask = (y != -1) & r.kept[part, None]
        logp, entropy = token_logps(model, x, y, entropy=True, temperature=self.temperature)
        old = r.old[part, :width] if r.old is not None else logp.detach()  # μ = 1: ρ = exp(0) = 1 exactly
        reference = r.reference[part, :width] if r.reference is not None else None
        per_token, metrics = self.losses(logp, old, reference, r.advantages[part], mask)
        loss = self.aggregate(per_token, mask, r.step_rows, r.step_tokens) * scale
        own = self.aggregate(per_token.detach(), mask, float(mask.any(-1).sum()), float(mask.sum()))
        metrics["entropy"] = (entropy * mask).sum() / mask.sum().clamp(min=1)
        return StepLoss(loss, own, {**r.metrics, **metrics})

    # --- validation ----------------------------------------------------------------------------------------

    def validate(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The dataset's answers' loss (val/loss, val/ppl); the rewards of the policy's greedy answers, each
        weighted by the answers it scored."""
        loss, weight, _ = Instruction().validate(model, batch)
        answers = self.answer(model, batch["prompts"], 1, 0.0, None, model.context_length)
        values, reward = self.score(batch["requests"], batch["references"], answers)
        n = torch.tensor(float(len(answers)))
        lengths = torch.tensor([float(len(ids)) for ids, _ in answers])
        metrics = {"reward": (reward.mean().float(), n), "completions/mean_length": (lengths.mean(), n),
                   "completions/eos": (torch.tensor(sum(e for _, e in answers) / len(answers)), n)}
        for i, r in enumerate(self.rewards):
            given = values[:, i][~values[:, i].isnan()]
            metrics[f"rewards/{r.name}"] = (given.mean().float() if len(given) else torch.tensor(0.0),
                                            torch.tensor(float(len(given))))
        return loss, weight, metrics

    # --- resume --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The round's rollouts, which the rest of the round trains on (μ > 1): kept in checkpoints."""
        return {"rollouts": self.rollouts.state() if self.rollouts is not None else None}

    def load_state_dict(self, state: dict) -> None:
        rollouts = state.get("rollouts")
        self.rollouts = Rollouts(**rollouts) if rollouts is not None else None
