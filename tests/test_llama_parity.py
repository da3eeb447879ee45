"""LLaMA against HF transformers' LlamaForCausalLM (the reference), float32, random weights with
grouped-query attention (4 query heads share 2 key/value heads) and perturbed RMSNorm weights.

Tolerances as for GPT-2: logits max |diff| <= 1e-5, loss relative <= 1e-6, gradients relative
<= 1e-5, 10 AdamW steps' losses within 1e-5, greedy decoding identical. The Meta and llama2.c
files are written here by the tests' own converters (HF's conversion run backwards), so a
mistake in gptexp's readers cannot cancel against the same mistake in a writer.
"""

import json
import struct

import numpy as np
import pytest
import torch
import transformers

from gptexp.models import Llama, LlamaConfig
from gptexp.weights import load_model, save_hf

VOCAB, CONTEXT, DIM, HEADS, KV_HEADS, LAYERS, HIDDEN = 97, 32, 64, 4, 2, 2, 96


def hf_reference(tie: bool = False, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=HIDDEN,
                                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                      num_key_value_heads=KV_HEADS, max_position_embeddings=CONTEXT,
                                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie,
                                      initializer_range=0.1, bos_token_id=None, eos_token_id=None,
                                      pad_token_id=None, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    return model


def gptexp_copy(hf: transformers.LlamaForCausalLM) -> Llama:
    c = hf.config
    model = Llama(LlamaConfig(dim=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
                              n_kv_heads=c.num_key_value_heads, vocab_size=c.vocab_size, hidden_dim=c.intermediate_size,
                              norm_eps=c.rms_norm_eps, max_seq_len=c.max_position_embeddings,
                              tie_embeddings=c.tie_word_embeddings))
    model.load_state_dict(hf.state_dict(), strict=True)
    return model.eval()


def batch(B: int = 3, T: int = CONTEXT, seed: int = 1):
    tokens = torch.randint(0, VOCAB, (B, T + 1), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def logits_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture
def pair():
    hf = hf_reference()
    return hf, gptexp_copy(hf)


def test_logits_loss_and_gradients_match_hf(pair):
    hf, ours = pair
    x, y = batch()
    ref = hf(x)
    ref_loss = torch.nn.functional.cross_entropy(ref.logits.reshape(-1, VOCAB), y.reshape(-1))
    logits, loss = ours(x, y)
    print(f"logits max |diff| {logits_diff(logits, ref.logits):.2e}")
    assert logits_diff(logits, ref.logits) <= 1e-5
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() <= 1e-6
    ref_loss.backward(), loss.backward()
    ref_grads = dict(hf.named_parameters())
    for name, param in ours.named_parameters():
        rel = ((param.grad - ref_grads[name].grad).norm() / ref_grads[name].grad.norm()).item()
        print(f"{name:45s} rel diff {rel:.2e}")
        assert rel <= 1e-5, name
    assert len(list(ours.parameters())) == len(list(hf.parameters()))


def test_ten_adamw_steps_match_hf(pair):
    hf, ours = pair
    hf.train(), ours.train()
    x, y = batch()
    settings = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    opt_ref, opt = torch.optim.AdamW(hf.parameters(), **settings), torch.optim.AdamW(ours.parameters(), **settings)
    for step in range(10):
        opt_ref.zero_grad(), opt.zero_grad()
        ref_loss = torch.nn.functional.cross_entropy(hf(x).logits.reshape(-1, VOCAB), y.reshape(-1))
        loss = ours(x, y)[1]
        ref_loss.backward(), loss.backward()
        opt_ref.step(), opt.step()
        print(f"step {step}: {loss.item():.6f} vs HF {ref_loss.item():.6f}")
        assert abs(loss.item() - ref_loss.item()) <= 1e-5


def test_greedy_generation_matches_no_cache_and_hf(pair):
    hf, ours = pair
    prompt, _ = batch(B=2, T=5, seed=3)
    cached = ours.generate(prompt, 24, temperature=0)
    uncached = ours.generate(prompt, 24, temperature=0, use_cache=False)
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False,
                      pad_token_id=0)
    assert torch.equal(cached, uncached) and torch.equal(cached, ref)


@pytest.mark.parametrize("tie", [False, True])
def test_hf_directories_both_ways(tmp_path, tie):
    hf = hf_reference(tie=tie)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")  # sharded: model.safetensors.index.json
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ours = load_model(tmp_path / "hf")
    x, _ = batch()
    assert logits_diff(ours(x)[0], hf(x).logits) <= 1e-5
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tie
    save_hf(ours, tmp_path / "ours")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert logits_diff(back(x).logits, hf(x).logits) <= 1e-5


# --- Meta's format, written by an independent converter --------------------------------------------

def to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's rotary row order -> Meta's (HF's convert_llama_weights_to_hf permute, inverted)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def write_meta(hf: transformers.LlamaForCausalLM, directory, shards: int) -> None:
    """params.json + consolidated.NN.pth split across `shards` model-parallel ranks, as Meta ships 13B/70B."""
    directory.mkdir()
    split_dim = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}
    s = hf.state_dict()
    meta = {"tok_embeddings.weight": s["model.embed_tokens.weight"], "norm.weight": s["model.norm.weight"],
            "output.weight": s["lm_head.weight"], "rope.freqs": torch.zeros(DIM // HEADS // 2)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        meta |= {f"layers.{i}.attention.wq.weight": to_meta_rows(s[p + "self_attn.q_proj.weight"], HEADS),
                 f"layers.{i}.attention.wk.weight": to_meta_rows(s[p + "self_attn.k_proj.weight"], KV_HEADS),
                 f"layers.{i}.attention.wv.weight": s[p + "self_attn.v_proj.weight"],
                 f"layers.{i}.attention.wo.weight": s[p + "self_attn.o_proj.weight"],
                 f"layers.{i}.feed_forward.w1.weight": s[p + "mlp.gate_proj.weight"],
                 f"layers.{i}.feed_forward.w2.weight": s[p + "mlp.down_proj.weight"],
                 f"layers.{i}.feed_forward.w3.weight": s[p + "mlp.up_proj.weight"],
                 f"layers.{i}.attention_norm.weight": s[p + "input_layernorm.weight"],
                 f"layers.{i}.ffn_norm.weight": s[p + "post_attention_layernorm.weight"]}
    for rank in range(shards):
        part = {}
        for key, tensor in meta.items():
            kind = key.split(".")[-2]
            dim = split_dim.get(kind)
            part[key] = tensor if dim is None else tensor.chunk(shards, dim=dim)[rank].clone()
        torch.save(part, directory / f"consolidated.{rank:02d}.pth")
    params = {"dim": DIM, "n_layers": LAYERS, "n_heads": HEADS, "n_kv_heads": KV_HEADS, "vocab_size": -1,
              "multiple_of": 32, "norm_eps": 1e-5}
    (directory / "params.json").write_text(json.dumps(params))


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_checkpoint_loads_to_the_same_logits(pair, tmp_path, shards):
    hf, _ = pair
    write_meta(hf, tmp_path / "meta", shards)
    ours = load_model(tmp_path / "meta")
    x, _ = batch()
    assert logits_diff(ours(x)[0], hf(x).logits) <= 1e-5


def test_a_missing_rotary_permutation_would_be_caught(pair, tmp_path):
    """Meta rows loaded as if they were HF rows: the logits move far beyond tolerance."""
    hf, _ = pair
    write_meta(hf, tmp_path / "meta", shards=1)
    ours = load_model(tmp_path / "meta")
    with torch.no_grad():
        for i in range(LAYERS):
            attn = ours.model.layers[i].self_attn
            attn.q_proj.weight.copy_(to_meta_rows(attn.q_proj.weight, HEADS))
    x, _ = batch()
    assert logits_diff(ours(x)[0], hf(x).logits) > 1e-2


# --- llama2.c's legacy .bin, written by an independent writer ----------------------------------------

def write_llama2c(hf: transformers.LlamaForCausalLM, path, shared: bool) -> None:
    s = {k: v.numpy() for k, v in hf.state_dict().items()}
    layers = lambda name, fn=lambda w: w: np.stack([fn(s[f"model.layers.{i}.{name}"]) for i in range(LAYERS)])  # noqa: E731
    rows = lambda heads: lambda w: to_meta_rows(torch.from_numpy(w), heads).numpy()  # noqa: E731
    half = DIM // HEADS // 2
    tensors = [s["model.embed_tokens.weight"], layers("input_layernorm.weight"),
               layers("self_attn.q_proj.weight", rows(HEADS)), layers("self_attn.k_proj.weight", rows(KV_HEADS)),
               layers("self_attn.v_proj.weight"), layers("self_attn.o_proj.weight"),
               layers("post_attention_layernorm.weight"), layers("mlp.gate_proj.weight"),
               layers("mlp.down_proj.weight"), layers("mlp.up_proj.weight"), s["model.norm.weight"],
               np.zeros((CONTEXT, half)), np.zeros((CONTEXT, half))] + ([] if shared else [s["lm_head.weight"]])
    header = struct.pack("<7i", DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB if shared else -VOCAB, CONTEXT)
    path.write_bytes(header + b"".join(np.ascontiguousarray(t, dtype="<f4").tobytes() for t in tensors))


@pytest.mark.parametrize("shared", [False, True])
def test_llama2c_bin_loads_to_the_same_logits(tmp_path, shared):
    hf = hf_reference(tie=shared)
    write_llama2c(hf, tmp_path / "model.bin", shared)
    ours = load_model(tmp_path / "model.bin")
    assert ours.config.tie_embeddings == shared and ours.config.max_seq_len == CONTEXT
    x, _ = batch()
    assert logits_diff(ours(x)[0], hf(x).logits) <= 1e-5


def test_bad_llama2c_files_are_named(pair, tmp_path):
    hf, _ = pair
    write_llama2c(hf, tmp_path / "model.bin", shared=False)
    data = (tmp_path / "model.bin").read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="the header describes .* bytes but the file has"):
        load_model(tmp_path / "short.bin")
    (tmp_path / "v1.bin").write_bytes(struct.pack("<I", 0x616B3432) + data[4:])
    with pytest.raises(ValueError, match="versioned llama2.c export"):
        load_model(tmp_path / "v1.bin")


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_heads=4, n_kv_heads=3), r"n_heads \(4\) must be divisible by n_kv_heads \(3\)"),
    (dict(dim=60, n_heads=8), r"dim \(60\) must be divisible by n_heads \(8\)"),
    (dict(n_layers=0), "n_layers must be a positive integer"),
])
def test_bad_llama_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig(**({"dim": 64, "n_heads": 4} | kwargs))


def test_llama2_7b_preset_has_meta_sizes():
    with torch.device("meta"):
        model = Llama(LlamaConfig())
    assert model.config.hidden_dim == 11008
    assert model.num_parameters() == 6_738_415_616  # LLaMA-2 7B
