"""A real pretrained model pins the whole LLaMA stack: llama2.c's stories260K (bundled) must write,
greedily from BOS, exactly the text llama2.c's own test expects (`run stories260K.bin -t 0 -n 200`)."""

import pytest
import torch
import transformers

from gptexp.core.config import asset_path
from gptexp.weights import load_model, load_source, save_hf

# llama2.c test_all.py expected_stdout: 200 steps from BOS, one new token each
LLAMA2C_EXPECTED = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw "
    "a big, red ball. She wanted to play with it, but it was too high.\n"
    "Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do. She said, \"I want "
    "to play with your ball, but I can't find it.\"\n"
    "Lily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what to do.\"\n"
    "Lily didn't want to help her mom, so she"
)


@pytest.fixture(scope="module")
def stories260k():
    return load_model(asset_path("stories260K/stories260K.bin")).eval()


def test_checkpoint_shape(stories260k):
    c = stories260k.config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.max_seq_len) == (
        64, 172, 5, 8, 4, 512, 512)
    assert c.tie_embeddings and stories260k.num_parameters() == 260_032  # the shared head counted once


def test_greedy_decoding_reproduces_llama2c(stories260k):
    tokenizer = load_source(asset_path("stories260K/stories260K.bin")).tokenizer
    assert tokenizer.vocab_size == 512 and tokenizer.bos_id == 1
    out = stories260k.generate(torch.tensor([[tokenizer.bos_id]]), max_new_tokens=200, temperature=0)
    assert tokenizer.decode(out[0, 1:].tolist()) == LLAMA2C_EXPECTED


def test_hf_transformers_agrees_on_the_real_weights(stories260k, tmp_path):
    save_hf(stories260k, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    assert (hf(x).logits - stories260k(x)[0]).abs().max().item() <= 1e-5
