import json

import pytest
import torch

from gptexp.core import hardware
from gptexp.inference import generation
from gptexp.inference.generation import onednn_linears, sample_next
from gptexp.models import GPT2, GPT2Config


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 1.0, 0.0]])
    assert sample_next(logits, temperature=0).tolist() == [[1], [0]]


def test_top_k_and_top_p_keep_only_the_likely_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_k=2, generator=g).unique().tolist()) == {0, 1}
    # 0.5 + 0.3 < 0.85: the third token is needed to cover top_p, the fourth is not
    assert set(sample_next(logits, top_p=0.85, generator=g).unique().tolist()) == {0, 1, 2}
    assert set(sample_next(logits, top_p=0.2, generator=g).unique().tolist()) == {0}
    counts = torch.bincount(sample_next(logits, generator=g).flatten(), minlength=4) / 2000
    assert torch.allclose(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.04)


def test_sampling_is_reproducible_with_a_generator():
    model = GPT2(GPT2Config(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16))
    prompt = torch.zeros(3, 2, dtype=torch.long)
    a = model.generate(prompt, 10, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 10, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (3, 12)
    assert model.training  # generate restores the mode it found


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1.0}, "temperature must be >= 0"),
    ({"top_k": 0}, "top_k must be >= 1"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
])
def test_bad_sampling_arguments(kwargs, message):
    model = GPT2(GPT2Config(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match=message):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 4, **kwargs)


def test_prompt_longer_than_the_context_is_refused():
    model = GPT2(GPT2Config(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match="prompt has 17 tokens but the model's context is 16"):
        model.generate(torch.zeros(1, 17, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="longer than the model's block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_model_config_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"n_embd \(100\) must be divisible by n_head \(3\)"):
        GPT2Config(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="n_layer must be a positive integer"):
        GPT2Config(n_layer=0)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2])  # float32's one row: the weights in place; else copies in oneDNN's layout
def test_onednn_linears_give_the_same_logits_and_are_removed_afterwards(rows, dtype, one_row_kernel):
    one_row_kernel("onednn")
    model = GPT2(GPT2Config(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32)).eval().to(dtype)
    x = torch.randint(0, 50, (rows, 16))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the products' own rounding, summed in float32
    with torch.inference_mode():
        plain = model(x)[0]
        with onednn_linears(model, batch=rows, min_bytes=0) as used:
            assert used
            torch.testing.assert_close(model(x)[0], plain, rtol=tolerance, atol=tolerance)
        with pytest.raises(RuntimeError, match="inside"), onednn_linears(model, batch=rows, min_bytes=0):
            raise RuntimeError("inside")
    assert not any("forward" in vars(m) for m in model.modules())  # the plain forward is back, even after an error
    with torch.inference_mode(), onednn_linears(model, batch=rows) as used:
        assert not used  # a few KiB of weights stay in the caches: the plain product is faster


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_one_float32_row_reads_through_the_kernel_measured_faster_on_this_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTEXP_CACHE", str(tmp_path))
    model = GPT2(GPT2Config(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32)).eval()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    key, path = hardware.cpu_key(torch.float32), hardware.kept_path(generation.ONE_ROW_KERNELS)
    with onednn_linears(model, batch=1, min_bytes=0) as used:  # the first call measures both and keeps the faster
        assert json.loads(path.read_text()) == {key: "onednn" if used else "mkl"}
    for kernel in ("onednn", "mkl"):  # a kept choice is used as it is, not measured again
        hardware.keep(generation.ONE_ROW_KERNELS, key, kernel)
        assert generation.one_row_kernel(linears) == kernel
        with onednn_linears(model, batch=1, min_bytes=0) as used:
            assert used == (kernel == "onednn")
        with onednn_linears(model, batch=2, min_bytes=0) as used:
            assert used  # more rows, and bf16, always read oneDNN's packed copies
    path.write_text("{damaged")
    assert generation.one_row_kernel(linears, rounds=1) in ("onednn", "mkl")  # measured again and rewritten
    assert key in hardware.read_kept(generation.ONE_ROW_KERNELS)


@pytest.mark.filterwarnings("ignore:TF32 acceleration")  # torch.backends.mkldnn.flags warns on CPU builds
@pytest.mark.parametrize("change", ["fp16", "mixed_dtypes", "compiled", "onednn_off"])
def test_onednn_linears_leave_other_models_alone(change):
    model = GPT2(GPT2Config(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16)).eval()
    if change == "fp16":
        model.to(torch.float16)
    if change == "mixed_dtypes":
        model.transformer.h[0].mlp.to(torch.bfloat16)
    if change == "compiled":
        model.compile()
    with torch.backends.mkldnn.flags(enabled=change != "onednn_off"), onednn_linears(model, 1, min_bytes=0) as packed:
        assert not packed


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prompts_of_different_lengths_decode_in_one_padded_batch(arch):
    """Left-padded rows (their padding masked, their positions their own) write what each prompt writes alone."""
    from gptexp.inference.generation import decode
    from gptexp.models import Llama, LlamaConfig

    torch.manual_seed(0)
    model = (GPT2(GPT2Config(block_size=48, vocab_size=97, n_layer=2, n_head=2, n_embd=32)) if arch == "gpt2" else
             Llama(LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=97,
                               max_seq_len=48))).eval()
    prompts = [torch.randint(1, 97, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 9, 6)]
    width = max(map(len, prompts))
    idx = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    pad = torch.tensor([width - len(p) for p in prompts])
    batched = torch.cat(list(decode(model, idx, 12, temperature=0, pad=pad)), dim=1)
    for row, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), 12, temperature=0)[0, len(prompt):]
        assert torch.equal(batched[row], alone), (row, batched[row], alone)
    with pytest.raises(ValueError, match="within the context"):
        decode(model, idx, 48, temperature=0, pad=pad)
