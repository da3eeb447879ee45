"""The fused decoding step (gptexp.inference.fused_step): one C call does what the quantized model's forward does for
one token of one row, for GPT-2 and LLaMA, and `decode` uses it; where it cannot apply, decoding runs forward."""

import pytest
import torch

from gptexp.inference import fused_step, generation, kernels, speculative
from gptexp.inference.quantize import quantize
from gptexp.models import GPT2, GPT2Config, Llama, LlamaConfig

pytestmark = pytest.mark.skipif(kernels.decode_step() is None, reason="no C compiler: decoding runs forward")
INT4 = kernels.available("int4_mv")  # the one-row int4 kernel needs AVX512-BF16


def gpt2() -> GPT2:  # widths that are multiples of 128, which the one-row int4 kernel takes
    return GPT2(GPT2Config(block_size=48, vocab_size=300, n_layer=2, n_head=4, n_embd=128)).eval()


def llama(tied: bool) -> Llama:  # grouped-query attention: 4 query heads share 2 key/value heads
    return Llama(LlamaConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=48,
                             hidden_dim=256, tie_embeddings=tied)).eval()


MODELS = {"gpt2": gpt2, "llama": lambda: llama(False), "llama_tied": lambda: llama(True)}


@pytest.fixture(scope="module", params=[(name, scheme) for name in MODELS for scheme in ("int8", "int4")],
                ids=lambda p: "-".join(p))
def quantized(request):
    name, scheme = request.param
    if scheme == "int4" and not INT4:
        pytest.skip("this CPU lacks AVX512-BF16")
    torch.manual_seed(0)
    return quantize(MODELS[name](), scheme, 64), scheme


@torch.inference_mode()
def test_a_fused_step_does_what_forward_does(quantized):
    model, scheme = quantized
    torch.manual_seed(1)
    prompt = torch.randint(0, 300, (1, 7))
    caches = [model.new_kv_cache(1, 40) for _ in range(2)]
    for cache in caches:
        model(prompt, cache=cache)  # the prompt through forward, as decode runs it
    step = model.fused_decode_step(caches[1])
    assert step is not None
    for token in torch.randint(0, 300, (30, 1, 1)):  # past a 16-position block of the attention's loops
        expected, got = model(token, cache=caches[0])[0], step(token, caches[1])
        # int8: the same float32 arithmetic in another order. int4: the products round their input to bf16, so
        # a 1e-7 difference in a norm's output can move an element by bf16's 4e-3, and a logit by ~1e-3 of the largest
        tolerance = 1e-5 if scheme == "int8" else 1e-2
        assert (got - expected).abs().max().item() <= tolerance * expected.abs().max().item()
    assert caches[1].length == caches[0].length == 37
    for a, b in [(caches[0].keys, caches[1].keys), (caches[0].values, caches[1].values)]:
        assert (a - b).abs().max().item() <= (1e-5 if scheme == "int8" else 1e-2) * a.abs().max().item()


@torch.inference_mode()
def test_decode_runs_the_fused_step_to_the_same_tokens(quantized, monkeypatch):
    model, scheme = quantized
    prompt = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(2))
    calls, original = [], type(model).fused_decode_step

    def counted(self, cache):
        step = original(self, cache)
        return lambda idx, cache: calls.append(1) or step(idx, cache)
    monkeypatch.setattr(type(model), "fused_decode_step", counted)
    fused = generation.generate(model, prompt, 43, temperature=0)  # to the end of the context
    assert len(calls) == 42  # every step after the prompt's
    # each token is forward's greedy choice at its place (forward over the whole sequence, no cache), or ties with
    # it within the arithmetic's differences: int4's products round their input to bf16
    logits = model(fused[:, :-1])[0][:, prompt.size(1) - 1:]
    shortfall = logits.amax(-1) - logits.gather(-1, fused[:, prompt.size(1):, None]).squeeze(-1)
    assert shortfall.max().item() <= (1e-5 if scheme == "int8" else 1e-2) * logits.abs().max().item()
    if scheme == "int8":
        monkeypatch.setattr(type(model), "fused_decode_step", lambda self, cache: None)
        assert torch.equal(fused, generation.generate(model, prompt, 43, temperature=0))


@torch.inference_mode()
def test_where_the_fused_step_cannot_apply_decoding_runs_forward():
    torch.manual_seed(0)
    plain = gpt2()
    assert plain.fused_decode_step(plain.new_kv_cache(1, 8)) is None  # float weights
    model = quantize(gpt2(), "int8")
    assert model.fused_decode_step(model.new_kv_cache(2, 8)) is None  # two rows
    assert model.fused_decode_step(model.new_kv_cache(1, 8, pad=torch.tensor([1]))) is None  # left padding
    bf16 = quantize(gpt2().bfloat16(), "int8")
    assert bf16.fused_decode_step(bf16.new_kv_cache(1, 8)) is None  # bf16 activations
    cache = model.new_kv_cache(1, 8)
    step = model.fused_decode_step(cache)
    with pytest.raises(ValueError, match="one token"):
        step(torch.zeros(1, 2, dtype=torch.long), cache)
    with pytest.raises(IndexError, match="token 300 is outside the vocabulary of 300 tokens"):
        step(torch.tensor([[300]]), cache)  # the C step checks what forward's embedding would
    assert cache.length == 0


@torch.inference_mode()
def test_a_quantized_draft_proposes_through_its_fused_step():
    torch.manual_seed(0)
    model, draft = quantize(gpt2(), "int8"), quantize(gpt2(), "int8")  # two different random models
    prompt = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(3))
    proposer = speculative.DraftModel(draft, tokens=3)
    plain = generation.generate(model, prompt, 30, temperature=0)
    speculated = torch.cat([prompt, *generation.decode(model, prompt, 30, temperature=0, proposer=proposer)], 1)
    assert torch.equal(speculated, plain)
    assert isinstance(proposer.step, fused_step.FusedStep)
