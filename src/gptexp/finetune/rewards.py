"""Rewards for reinforcement learning (finetune=grpo): plain functions that score completions, and the checks that
turn a faulty one into one line naming it.

A reward is any function called with keyword arguments, one value per completion:

    def my_reward(prompts, completions, **kwargs) -> list[float | None]

- prompts: the request each completion answers (the last user message, as text);
- completions: the completions' text (without the token that ended them);
- ended: whether each completion ended with the template's end-of-answer token (EOS) before max_new_tokens;
- references: the dataset's own answer to each request;
- completion_ids: each completion's token ids (its EOS included where it has one).

It returns a float per completion, or None to abstain (a reward that does not apply to that request); finetune.rewards
names it by Hydra `_target_` (arguments beside it are bound to the function), and finetune.reward_weights weighs it
(1 by default) in the sum that trains: a completion's reward is the weighted sum of the rewards that did not abstain.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gptexp.core.config import BadInput, ConfigError
from gptexp.data.instruct import story_request_words


class RewardError(BadInput):
    """A reward function raised, or returned what is not one number (or None) per completion."""


def requested_words(prompts: list[str], completions: list[str], **_) -> list[float | None]:
    """The share of the words a story request asks for ("Write a story that uses the words: a, b, c.") that the
    completion uses, as whole words in any case (benchmarks/instruction_following.py's word rate); None (abstain)
    for a request that names no words."""
    scores = []
    for prompt, text in zip(prompts, completions):
        words = story_request_words(prompt)
        used = sum(re.search(rf"\b{re.escape(w)}\b", text, re.IGNORECASE) is not None for w in words)
        scores.append(used / len(words) if words else None)
    return scores


def fresh_ngrams(completions: list[str], n: int = 4, **_) -> list[float]:
    """1 minus the share of the completion's word n-grams that repeat an earlier one of it (1: no n-gram twice; a
    loop of one sentence approaches 0); 1 for a completion of fewer than n words."""
    scores = []
    for text in completions:
        words = re.findall(r"\w+", text.lower())
        grams = list(zip(*(words[i:] for i in range(n))))
        scores.append(len(set(grams)) / len(grams) if grams else 1.0)
    return scores


def ends_with_eos(ended: list[bool], **_) -> list[float]:
    """1 for a completion that ended with EOS (it finished its answer), 0 for one cut at max_new_tokens."""
    return [float(e) for e in ended]


@dataclass
class Reward:
    name: str  # its key in finetune.rewards
    function: Callable[..., Any]
    target: str  # the function's dotted path, for messages
    weight: float


def build(rewards: Mapping[str, Any] | None, weights: Mapping[str, Any] | None) -> list[Reward]:
    """The rewards finetune.rewards names ({name: {_target_: module.function, ...arguments}}), weighted by
    finetune.reward_weights ({name: weight}, 1 by default)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if not rewards:
        raise ConfigError("finetune=grpo needs at least one reward: finetune.rewards={name: {_target_: "
                          "module.function}} (e.g. gptexp.finetune.rewards.requested_words)")
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(rewards))
    if unknown:
        raise ConfigError(f"finetune.reward_weights names {unknown}, which finetune.rewards does not "
                          f"({', '.join(rewards)})")
    built = []
    for name, spec in rewards.items():
        if not isinstance(spec, Mapping) or "_target_" not in spec:
            raise ConfigError(f"finetune.rewards.{name} must be {{_target_: module.function}}, got {spec!r}")
        try:
            function = instantiate(dict(spec), _partial_=True)
        except InstantiationException as error:
            raise ConfigError(f"finetune.rewards.{name}: cannot import {spec['_target_']} "
                              f"({str(error).splitlines()[-1].split(', set env var')[0]})") from None
        weight = weights.get(name, 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"finetune.reward_weights.{name} must be a number, got {weight!r}")
        built.append(Reward(name, function, spec["_target_"], float(weight)))
    return built


def score(reward: Reward, count: int, **arguments) -> list[float | None]:
    """`reward`'s values for `count` completions, checked: a reward that raises, returns NaN or infinity, or not one
    value per completion is a RewardError naming it."""
    where = f"reward {reward.name} ({reward.target})"
    try:
        values = reward.function(**arguments)
    except Exception as error:  # the user's function: whatever it raised, answered in one line
        raise RewardError(f"{where} raised {type(error).__name__}: {error}; fix it, or remove it from "
                          f"finetune.rewards") from error
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"{where} returned {type(values).__name__}, not a list of {count} numbers (one per "
                          f"completion, None to abstain)") from None
    if len(values) != count:
        raise RewardError(f"{where} returned {len(values)} values for {count} completions; it must return one per "
                          f"completion (None to abstain)")
    for i, value in enumerate(values):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise RewardError(f"{where} returned {value!r} for completion {i + 1}; a reward is a finite number, or "
                              f"None to abstain")
    return [None if v is None else float(v) for v in values]
