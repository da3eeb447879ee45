import math

import pytest
import torch

from gptexp.core.config import ConfigError, build_dataclass
from gptexp.models import GPT2, GPT2Config
from gptexp.training.module import LanguageModelModule
from gptexp.training.optim import OptimConfig, build_optimizer, lr_at


def tiny_module(**optim) -> LanguageModelModule:
    model = GPT2(GPT2Config(block_size=16, vocab_size=20, n_layer=1, n_head=2, n_embd=16))
    return LanguageModelModule(model, OptimConfig(**optim))


def test_validation_perplexity_is_token_weighted():
    """exp of the mean over all tokens, not a mean of per-batch values: batches of unequal size."""
    module = tiny_module().eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 20, (b, 17), generator=g) for b in (5, 1, 3)]
    all_losses = []
    with torch.no_grad():
        for i, tokens in enumerate(batches):
            x, y = tokens[:, :-1], tokens[:, 1:]
            module.validation_step((x, y), i)
            logits, _ = module.model(x)
            all_losses.append(torch.nn.functional.cross_entropy(logits.reshape(-1, 20), y.reshape(-1), reduction="none"))
    expected = torch.cat(all_losses).mean()
    per_batch_mean = torch.stack([l.mean() for l in all_losses]).mean()
    assert not torch.isclose(expected, per_batch_mean, rtol=0, atol=1e-6)  # the test can tell them apart
    assert torch.isclose(module.val_loss.compute(), expected, rtol=1e-6)


def test_schedule_warms_up_then_decays_to_min_lr():
    optim = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    lrs = [lr_at(step, optim, decay_steps=110) for step in range(130)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111]))
    assert lrs[60] == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 9e-4)
    assert lrs[110:] == [1e-4] * 20


def test_weight_decay_only_on_matrices():
    module = tiny_module()
    optimizer = build_optimizer(module.model, OptimConfig(weight_decay=0.1))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.model.parameters()))


@pytest.mark.parametrize("values, message", [
    ({"lr": 1e-4, "min_lr": 1e-3}, "need 0 <= min_lr <= lr"),
    ({"betas": [0.9]}, "optim.betas must be a list of 2 values"),
    ({"betas": [0.9, 1.5]}, r"betas must be in \[0, 1\)"),
    ({"lr": "fast"}, "optim.lr must be a float, got 'fast'"),
    ({"warmup_steps": 1.5}, "optim.warmup_steps must be an int"),
])
def test_bad_optimizer_config(values, message):
    with pytest.raises(ConfigError, match=message):
        build_dataclass(OptimConfig, values, "optim")
