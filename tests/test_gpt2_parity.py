"""GPT-2 against HF transformers' GPT2LMHeadModel (the reference), float32, random weights.

Tolerances (from the issue): logits max |diff| <= 1e-5; loss relative diff <= 1e-6; each
parameter gradient ||g - g_ref|| / ||g_ref|| <= 1e-5; 10 AdamW steps (llm.c test_gpt2's
settings) give losses within 1e-5 of the reference, step by step; greedy decoding is identical.
"""

import pytest
import torch
import transformers

from gptexp.core.config import ConfigError
from gptexp.inference.generation import onednn_linears
from gptexp.models import GPT2, GPT2Config
from gptexp.weights import load_model, load_source, save_hf
from gptexp.weights.hf import CONV1D_WEIGHTS, gpt2_state_from_hf

VOCAB, BLOCK = 101, 32


def hf_reference(seed: int = 0) -> transformers.GPT2LMHeadModel:
    """A random HF GPT-2 whose LayerNorm weights and every bias are perturbed away from 1 / 0."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=BLOCK, n_embd=48, n_layer=3, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.1,
                                     bos_token_id=None, eos_token_id=None, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def gptexp_copy(hf: transformers.GPT2LMHeadModel) -> GPT2:
    c = hf.config
    model = GPT2(GPT2Config(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                            n_head=c.n_head, n_embd=c.n_embd))
    model.load_state_dict(gpt2_state_from_hf(hf.state_dict()), strict=True)
    return model.eval()


def batch(B: int = 4, T: int = BLOCK, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (B, T + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def pair():
    hf = hf_reference()
    return hf, gptexp_copy(hf)


def test_logits_and_loss_match_hf(pair):
    hf, ours = pair
    x, _ = batch()
    ref = hf(x, labels=x)  # HF shifts labels itself: position t predicts x[t + 1], the last one is ignored
    targets = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -1)], dim=1)
    logits, loss = ours(x, targets)
    assert logits.shape == (4, BLOCK, VOCAB)
    diff = (logits - ref.logits).abs().max().item()
    print(f"logits max |diff| {diff:.2e}, loss {loss.item():.6f} vs {ref.loss.item():.6f}")
    assert diff <= 1e-5
    assert abs(loss.item() - ref.loss.item()) / ref.loss.item() <= 1e-6


def test_gradients_match_hf(pair):
    hf, ours = pair
    x, _ = batch()
    hf(x, labels=x).loss.backward()
    targets = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -1)], dim=1)
    ours(x, targets)[1].backward()
    ref_grads = gpt2_state_from_hf({name: p.grad for name, p in hf.named_parameters()})
    rows = [(name, relative(p.grad, ref_grads[name])) for name, p in ours.named_parameters()]
    for name, rel in rows:
        print(f"{name:40s} rel diff {rel:.2e}")
    assert len(rows) == len(list(hf.parameters()))  # every parameter compared
    bad = [(n, r) for n, r in rows if not r <= 1e-5]
    assert not bad, f"gradients off: {bad}"


def test_ten_adamw_steps_match_hf(pair):
    """llm.c's test_gpt2: the same batch, AdamW(lr 1e-4, betas 0.9/0.999, eps 1e-8, wd 0.01 on all)."""
    hf, ours = pair
    hf.train(), ours.train()
    x, y = batch()
    hf_labels = torch.cat([x, y[:, -1:]], dim=1)  # HF's shift then predicts y at every position of x
    settings = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    opt_ref, opt = torch.optim.AdamW(hf.parameters(), **settings), torch.optim.AdamW(ours.parameters(), **settings)
    losses = []
    for _ in range(10):
        opt_ref.zero_grad(), opt.zero_grad()
        logits = hf(x).logits
        ref_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), hf_labels[:, 1:].reshape(-1))
        loss = ours(x, y)[1]
        ref_loss.backward(), loss.backward()
        opt_ref.step(), opt.step()
        losses.append((loss.item(), ref_loss.item()))
    for step, (a, b) in enumerate(losses):
        print(f"step {step}: {a:.6f} vs HF {b:.6f} (diff {abs(a - b):.1e})")
    assert all(abs(a - b) <= 1e-5 for a, b in losses)
    assert losses[-1][0] < losses[0][0]


def test_greedy_generation_matches_no_cache_and_hf(pair):
    hf, ours = pair
    prompt, _ = batch(B=2, T=6, seed=3)
    cached = ours.generate(prompt, max_new_tokens=20, temperature=0)
    uncached = ours.generate(prompt, max_new_tokens=20, temperature=0, use_cache=False)
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                      pad_token_id=0)

    assert torch.equal(cached, uncached)
    assert torch.equal(cached, ref)


@pytest.mark.parametrize("rows, one_row", [(1, "onednn"), (1, "mkl"), (2, None)])
def test_greedy_generation_through_onednn_matches_hf(rows, one_row, one_row_kernel):
    """A model big enough (39 MiB of linear weights) that CPU decoding runs through oneDNN: one row from the
    weights in place, through oneDNN or MKL (whichever this machine reads faster), two from packed copies."""
    if one_row:
        one_row_kernel(one_row)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=192, n_layer=2, n_head=4,
                                     bos_token_id=None, eos_token_id=None)
    hf = transformers.GPT2LMHeadModel(config).eval()
    ours = gptexp_copy(hf)
    with onednn_linears(ours, batch=rows) as used:
        assert used == (one_row != "mkl" and torch.backends.mkldnn.is_available())
    prompt = torch.randint(0, 50257, (rows, 8), generator=torch.Generator().manual_seed(5))
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                      pad_token_id=0)
    assert torch.equal(ours.generate(prompt, max_new_tokens=16, temperature=0), ref)
    assert torch.equal(ours.generate(prompt, max_new_tokens=16, temperature=0, use_cache=False), ref)


def test_generation_slides_past_the_context(pair):
    """Past block_size every step re-reads the last block_size tokens, with or without a cache."""
    _, ours = pair
    prompt, _ = batch(B=1, T=BLOCK - 4, seed=4)
    cached = ours.generate(prompt, max_new_tokens=12, temperature=0)
    uncached = ours.generate(prompt, max_new_tokens=12, temperature=0, use_cache=False)
    assert cached.shape == (1, BLOCK + 8)
    assert torch.equal(cached, uncached)


def test_save_pretrained_loads_in_transformers(pair, tmp_path):
    _, ours = pair
    save_hf(ours, tmp_path)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    x, _ = batch()
    assert (reloaded(x).logits - ours(x)[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("layout", ["safetensors", "bin", "bin-without-prefix"])
def test_load_model_reads_hf_directories(pair, tmp_path, layout):
    hf, _ = pair
    if layout == "safetensors":
        hf.save_pretrained(tmp_path)
    else:
        hf.config.save_pretrained(tmp_path)
        state = hf.state_dict()
        if layout == "bin-without-prefix":  # as OpenAI's GPT-2 on the hub: GPT2Model keys plus mask buffers
            state = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
            state["h.0.attn.bias"] = torch.ones(1, 1, BLOCK, BLOCK).tril()
        torch.save(state, tmp_path / "pytorch_model.bin")
    loaded = load_model(tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    x, _ = batch()
    assert (loaded(x)[0] - hf(x).logits).abs().max().item() <= 1e-5


def test_transposes_are_exactly_the_conv1d_weights(pair):
    hf, ours = pair
    hf_state = hf.state_dict()
    for name, tensor in ours.state_dict().items():
        source = hf_state[name]
        assert tensor.shape == (source.t().shape if name.endswith(CONV1D_WEIGHTS) else source.shape), name


def test_hub_id_offline_fails_at_once_with_a_way_out(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match="pass a local directory"):
        load_source("gpt2")


def test_missing_local_path_is_named():
    with pytest.raises(ConfigError, match="./no/such/dir does not exist"):
        load_source("./no/such/dir")


def test_checkpoint_of_another_shape_names_the_tensor(pair, tmp_path):
    hf, _ = pair
    hf.save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text().replace('"n_embd": 48', '"n_embd": 64')
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(ValueError, match="size mismatch for transformer.wte.weight"):
        load_source(tmp_path)


def test_bf16_greedy_generation_through_onednn_matches_hf_in_bf16():
    """bf16 weights (38 MiB of linear weights: decoding runs through oneDNN's packed bf16 copies) against HF's
    bf16 GPT-2 on the same weights: the greedy tokens agree, batch 1 and 2."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=384, n_layer=2, n_head=6,
                                     bos_token_id=None, eos_token_id=None)
    hf = transformers.GPT2LMHeadModel(config).eval()
    ours = gptexp_copy(hf).to(torch.bfloat16)
    hf.to(torch.bfloat16)
    with onednn_linears(ours, batch=1) as used:
        assert used or not torch.backends.mkldnn.is_available()
    for rows in (1, 2):
        prompt = torch.randint(0, 50257, (rows, 8), generator=torch.Generator().manual_seed(rows))
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                          pad_token_id=0)
        assert torch.equal(ours.generate(prompt, max_new_tokens=16, temperature=0), ref)
