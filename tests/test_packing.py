"""Packed sequences (forward's `documents`): several examples in one row, each computed exactly as if it stood
alone (its logits, its summed loss, its gradients), for GPT-2, a LLaMA with grouped-query attention and the real
stories260K; documents=None changes nothing, a KV cache is refused, and a LoRA (peft) model passes documents on."""

import copy

import pytest
import torch
import torch.nn.functional as F

from gptexp import finetune
from gptexp.core.config import asset_path
from gptexp.models import GPT2, GPT2Config, Llama, LlamaConfig
from gptexp.models.attention import document_mask, document_positions
from gptexp.weights import load_model

ROWS = ((300, 45, 67), (150, 200))  # example lengths of each row; the second row ends in 62 tokens of padding
T = sum(ROWS[0])


@pytest.fixture(scope="module", params=["gpt2", "llama_gqa", "stories260K"])
def model(request):
    torch.manual_seed(0)
    if request.param == "gpt2":
        model = GPT2(GPT2Config(block_size=512, vocab_size=97, n_layer=2, n_head=2, n_embd=32))
    elif request.param == "llama_gqa":
        model = Llama(LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=64,
                                  max_seq_len=512))
    else:
        model = load_model(asset_path("stories260K/stories260K.bin"))
        assert model.config.n_kv_heads < model.config.n_heads
    return model.float().eval()


def examples(model) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each row's examples as (inputs, targets) pairs of random tokens, the targets shifted by one."""
    generator = torch.Generator().manual_seed(1)
    vocab = model.lm_head.weight.size(0)
    rows = []
    for lengths in ROWS:
        tokens = [torch.randint(0, vocab, (n + 1,), generator=generator) for n in lengths]
        rows.append([(t[:-1], t[1:]) for t in tokens])
    return rows


def pack(rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """idx, targets and documents (B, T) of the rows' examples end to end; padding: token 0, target -1, a fresh id."""
    idx, targets = torch.zeros(len(rows), T, dtype=torch.long), torch.full((len(rows), T), -1)
    documents = torch.full((len(rows), T), len(ROWS[0]))
    for b, row in enumerate(rows):
        start = 0
        for d, (x, y) in enumerate(row):
            idx[b, start:start + len(x)], targets[b, start:start + len(x)] = x, y
            documents[b, start:start + len(x)] = d
            start += len(x)
    return idx, targets, documents


def spans(rows):
    """(row, slice, inputs, targets) of every packed example."""
    for b, row in enumerate(rows):
        start = 0
        for x, y in row:
            yield b, slice(start, start + len(x)), x, y
            start += len(x)


def logits_diff(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Max difference, relative to the logits' scale where it exceeds 1 (stories260K's reach 18: float32 noise
    between batch shapes alone is 1e-5 there)."""
    return (got - expected).abs().max().item() / max(1.0, expected.abs().max().item())


def summed_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1,
                           reduction="sum")


def test_positions_and_mask_of_documents():
    documents = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
    assert document_positions(documents).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    blocks = torch.block_diag(*(torch.ones(n, n, dtype=torch.bool).tril() for n in (3, 2, 3)))
    assert torch.equal(document_mask(documents), blocks[None, None])


def test_each_packed_example_computes_as_if_alone(model):
    rows = examples(model)
    idx, targets, documents = pack(rows)
    with torch.no_grad():
        logits, loss = model(idx, targets, documents=documents)
        _, head_loss = model(idx, targets, return_logits=False, documents=documents)
        assert torch.isfinite(logits).all()  # the padding too
        total = 0.0
        for b, span, x, y in spans(rows):
            alone = model(x[None])[0][0]
            diff = logits_diff(logits[b, span], alone)
            packed_sum, alone_sum = summed_loss(logits[b, span], y).item(), summed_loss(alone, y).item()
            print(f"row {b} tokens {span.start}-{span.stop}: logits max diff {diff:.2e}, "
                  f"summed loss {packed_sum:.6f} vs {alone_sum:.6f} alone")
            assert diff <= 1e-5
            assert abs(packed_sum - alone_sum) <= 1e-5 * abs(alone_sum)
            total += alone_sum
    scored = (targets != -1).sum().item()
    assert abs(loss.item() * scored - total) <= 1e-5 * total
    assert abs(head_loss.item() - loss.item()) <= 1e-5  # return_logits=False: the same loss without the logits


def test_gradients_of_the_packed_loss_are_the_sum_of_the_examples(model):
    rows = examples(model)
    idx, targets, documents = pack(rows)

    def gradients(losses) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        for loss in losses():
            loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    alone = gradients(lambda: (summed_loss(model(x[None])[0], y) for _, _, x, y in spans(rows)))
    packed = gradients(lambda: [summed_loss(model(idx, documents=documents)[0], targets)])
    model.train()
    model.activation_checkpointing = True  # the mask travels through run_block into the recomputed blocks
    try:
        checkpointed = gradients(lambda: [summed_loss(model(idx, documents=documents)[0], targets)])
    finally:
        model.activation_checkpointing = False
        model.eval()
        model.zero_grad(set_to_none=True)
    worst = 0.0
    for name, expected in alone.items():
        for got in (packed[name], checkpointed[name]):
            relative = ((got - expected).norm() / expected.norm()).item()
            assert relative <= 1e-5, f"{name}: {relative:.2e}"
            worst = max(worst, relative)
    print(f"worst relative gradient difference {worst:.1e}")


def test_no_documents_changes_nothing_and_one_document_is_the_plain_causal_model(model):
    idx = pack(examples(model))[0]
    with torch.no_grad():
        plain = model(idx)[0]
        assert torch.equal(model(idx, documents=None)[0], plain)
        one = model(idx, documents=torch.zeros_like(idx))[0]
    assert logits_diff(one, plain) <= 1e-5


def test_kv_cache_with_documents_is_refused(model):
    idx, _, documents = pack(examples(model))
    for pad in (None, torch.tensor([0, 3])):
        with pytest.raises(ValueError, match="KV cache"):
            model(idx, cache=model.new_kv_cache(2, T, pad=pad), documents=documents)
    with pytest.raises(ValueError, match="shape"):
        model(idx, documents=documents[:, :-1])


def test_lora_model_passes_documents_through(model):
    rows = examples(model)
    idx, targets, documents = pack(rows)
    lora = finetune.apply(copy.deepcopy(model), {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0})
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)  # non-zero, so the adapter matters
        logits, loss = lora(idx, targets, documents=documents)
        assert logits_diff(logits, model(idx, documents=documents)[0]) > 1e-3
        for b, span, x, _ in spans(rows):
            assert logits_diff(logits[b, span], lora(x[None])[0][0]) <= 1e-5
    assert torch.isfinite(loss)
