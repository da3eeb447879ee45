"""optim=muon: torch.optim.Muon on the hidden matrices and AdamW on the rest, as one optimizer that steps,
schedules and resumes exactly as the two would on their own."""

import copy

import pytest
import torch

from gptexp.models import GPT2, GPT2Config, Llama, LlamaConfig
from gptexp.training.optim import MuonWithAdamW, OptimConfig, adamw, build_optimizer, hidden_matrices, lr_at

MUON = OptimConfig(name="muon", lr=3e-3, muon_lr=0.02, warmup_steps=2)


def gpt2() -> GPT2:
    torch.manual_seed(0)
    return GPT2(GPT2Config(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=16))


def train(model, optimizer, steps: int, schedule=None) -> list[float]:
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, 40, (4, 16), generator=generator)
        _, loss = model(x, x.roll(-1, 1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if schedule:
            schedule.step()
        losses.append(loss.item())
    return losses


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = gpt2()
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in hidden_matrices(model)) == sorted(
        f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    llama = Llama(LlamaConfig(dim=16, n_layers=1, n_heads=2, vocab_size=40, max_seq_len=16, hidden_dim=32))
    llama_names = {id(p): n for n, p in llama.named_parameters()}
    assert all("embed_tokens" not in llama_names[id(p)] and "lm_head" not in llama_names[id(p)] and p.dim() == 2
               for p in hidden_matrices(llama)) and len(hidden_matrices(llama)) == 7  # q k v o, gate up down


def test_one_step_is_muons_and_adamws_own():
    model = gpt2()
    reference = copy.deepcopy(model)
    combined = build_optimizer(model, MUON)
    assert isinstance(combined, MuonWithAdamW)
    matrices = hidden_matrices(reference)
    chosen = {id(p) for p in matrices}
    muon = torch.optim.Muon(matrices, lr=0.02, weight_decay=0.0, momentum=0.95, adjust_lr_fn="original")
    rest = adamw([p for p in reference.parameters() if id(p) not in chosen], MUON)
    for _ in range(3):
        train(model, combined, 1)
        train(reference, type("Both", (), {"zero_grad": lambda s: (muon.zero_grad(), rest.zero_grad()),
                                           "step": lambda s: (muon.step(), rest.step())})(), 1)
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), name


def test_the_schedule_moves_both_learning_rates_and_survives_a_reload():
    model = gpt2()
    optimizer = build_optimizer(model, MUON)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, MUON, 10) / MUON.lr)
    train(model, optimizer, 4, schedule)
    factor = lr_at(4, MUON, 10) / MUON.lr
    assert optimizer.muon.param_groups[0]["lr"] == pytest.approx(0.02 * factor)
    assert optimizer.adamw.param_groups[0]["lr"] == pytest.approx(3e-3 * factor)

    state = copy.deepcopy((model.state_dict(), optimizer.state_dict(), schedule.state_dict()))
    expected = train(model, optimizer, 5, schedule)
    resumed_model = gpt2()
    resumed_model.load_state_dict(state[0])
    resumed = build_optimizer(resumed_model, MUON)
    resumed_schedule = torch.optim.lr_scheduler.LambdaLR(resumed, lambda step: lr_at(step, MUON, 10) / MUON.lr)
    resumed.load_state_dict(state[1])
    resumed_schedule.load_state_dict(state[2])
    assert train(resumed_model, resumed, 5, resumed_schedule) == expected  # momentum and LRs came back
    assert resumed.muon.param_groups[0]["lr"] == pytest.approx(0.02 * lr_at(9, MUON, 10) / MUON.lr)
