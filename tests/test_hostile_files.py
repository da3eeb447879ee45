"""Files that claim more than they hold: every reader holds the sizes its metadata claims against the tensors the file
actually holds (and its size on disk) before it builds anything, and refuses a mismatch in one line naming the
field. Each case runs `sample` in a process that may map 2 GiB more than it started with: a reader that believed
the claim would fail there (or time out) instead of exhausting the machine."""

import dataclasses
import json
import re
import struct

import numpy as np
import pytest
import torch

from gptexp.core.config import asset_path
from gptexp.models import GPT2, GPT2Config
from gptexp.weights import gguf, hf, load_source, quantized
from gptexp.weights.meta import META_NAMES
from training import execute

LIMIT = 2 * 2**30
HUGE = 2**32 - 1


def written_gguf(source, path, **claims):
    """`source` written as GGUF with its metadata claiming `claims` (config fields) over the same tensors."""
    config = source.model.config
    source.model.config = dataclasses.replace(config, **claims)
    try:
        gguf.write(source.model, source.tokenizer, path, "f32")
    finally:
        source.model.config = config
    return path


def meta_directory(source, directory, **claims):
    """A Meta directory (params.json + consolidated.00.pth) of `source`'s tensors, params.json claiming `claims`."""
    directory.mkdir()
    c = source.model.config
    ours = {name: meta for meta, (name, _) in META_NAMES.items()}
    state = {}
    for key, tensor in source.model.state_dict().items():
        layer = re.match(r"model\.layers\.(\d+)\.(.+)", key)
        state[f"layers.{layer.group(1)}.{ours[layer.group(2)]}" if layer else ours[key]] = tensor.clone()
    torch.save(state, directory / "consolidated.00.pth")
    params = {"dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
              "norm_eps": c.norm_eps, "max_seq_len": c.max_seq_len} | claims
    (directory / "params.json").write_text(json.dumps(params))
    (directory / "tokenizer.model").write_bytes(open(asset_path("stories260K/tok512.model"), "rb").read())
    return directory


def hf_directory(model, directory, **claims):
    hf.write(model, directory)
    config = json.loads((directory / "config.json").read_text()) | claims
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def quantized_file(source, path, **claims):
    """export format=quantized's file of `source` at int8, its metadata's config claiming `claims`."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    source.place(quantize="int8")
    quantized.write(source, path)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    spec = json.loads(metadata["model"])
    spec["config"] |= claims
    save_file(load_file(str(path)), str(path), metadata=metadata | {"model": json.dumps(spec)})
    return path


def training_checkpoint(run_dir, path, **claims):
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    state["gptexp_model"]["config"] |= claims
    torch.save(state, path)
    return path


def llmc_header(path, **header):
    """An llm.c model file's header claiming `header` (maxT, V, L, NH, C, Vp) over 4 KiB of zeros."""
    values = np.zeros(256, dtype="<i4")
    values[:8] = [20240326, 3, header["maxT"], header["V"], header["L"], header["NH"], header["C"], header["Vp"]]
    path.write_bytes(values.tobytes() + bytes(4096))
    return path


def llama2c_header(path, *header):
    path.write_bytes(struct.pack("<7i", *header) + bytes(4096))
    (path.parent / "tok512.model").write_bytes(open(asset_path("stories260K/tok512.model"), "rb").read())
    return path


@pytest.fixture(scope="module")
def gpt2_bpe():
    """A 1-block GPT-2 32 wide with GPT-2's whole vocabulary (the GGUF writer carries its BPE) and its tokenizer."""
    from gptexp.data.tokenizers import gpt2_tokenizer
    from gptexp.weights.source import Source

    torch.manual_seed(0)
    return Source(GPT2(GPT2Config(block_size=32, n_layer=1, n_head=2, n_embd=32)).eval(), gpt2_tokenizer(), "tiny")


# case -> (how to write the file from stories260K, the tiny GPT-2, the run and tmp_path; what the one line must say)
CASES = {
    "GGUF llama context_length": (lambda s, g, r, t: written_gguf(s, t / "m.gguf", max_seq_len=HUGE),
                                  ["llama.context_length=4294967295 asks for a rope_cos table of 128.0 GiB"]),
    "GGUF llama block_count": (lambda s, g, r, t: written_gguf(s, t / "m.gguf", n_layers=HUGE),
                               ["llama.block_count=4294967295 claims 4294967295 blocks", "hold 5 blocks (0..4)"]),
    "GGUF llama embedding_length": (lambda s, g, r, t: written_gguf(s, t / "m.gguf", dim=2**20, n_heads=8),
                                    ["size mismatch for model.embed_tokens.weight: llama.embedding_length=1048576 "
                                     "claims (512, 1048576), but the file holds (512, 64)"]),
    "GGUF gpt2 context_length": (lambda s, g, r, t: written_gguf(g, t / "m.gguf", block_size=HUGE),
                                 ["transformer.wpe.weight: gpt2.context_length=4294967295 claims (4294967295, 32)"]),
    "GGUF gpt2 block_count": (lambda s, g, r, t: written_gguf(g, t / "m.gguf", n_layer=HUGE),
                              ["gpt2.block_count=4294967295 claims 4294967295 blocks", "hold 1 block (0..0)"]),
    "checkpoint width": (lambda s, g, r, t: training_checkpoint(r, t / "wide.ckpt", n_embd=2**20),
                         ["size mismatch for transformer.wte.weight: its recorded n_embd=1048576 claims "
                          "(65, 1048576), but the file holds (65, 32)"]),
    "checkpoint depth": (lambda s, g, r, t: training_checkpoint(r, t / "deep.ckpt", n_layer=2**31 - 1),
                         ["its recorded n_layer=2147483647 claims 2147483647 blocks"]),
    "HF n_layer": (lambda s, g, r, t: hf_directory(g.model, t / "hf", n_layer=HUGE),
                   ["config.json's n_layer=4294967295 claims 4294967295 blocks"]),
    "HF max_position_embeddings": (lambda s, g, r, t: hf_directory(s.model, t / "hf", max_position_embeddings=HUGE),
                                   ["config.json's max_position_embeddings=4294967295 asks for a rope_cos table"]),
    "Meta n_layers": (lambda s, g, r, t: meta_directory(s, t / "meta", n_layers=HUGE),
                      ["params.json's n_layers=4294967295 claims 4294967295 blocks"]),
    "Meta max_seq_len": (lambda s, g, r, t: meta_directory(s, t / "meta", max_seq_len=HUGE),
                         ["params.json's max_seq_len=4294967295 asks for a rope_cos table"]),
    "quantized n_layers": (lambda s, g, r, t: quantized_file(s, t / "q.safetensors", n_layers=HUGE),
                           ["n_layers=4294967295 claims 4294967295 blocks"]),
    "llm.c header": (lambda s, g, r, t: llmc_header(t / "m.bin", maxT=2**31 - 1, V=50257, L=2**31 - 1, NH=12,
                                                    C=3072, Vp=50304),
                     ["truncated in tensor wte (the file has 5120 bytes"]),
    "llama2.c header": (lambda s, g, r, t: llama2c_header(t / "m.bin", 2**30, 2**30, 2**30, 2**20, 2**20, 512, 2**30),
                        ["bytes but the file has 4124 (truncated, or not a llama2.c legacy export)"]),
}


@pytest.mark.parametrize("case", CASES)
def test_a_claim_the_tensors_do_not_bear_out_is_refused_before_anything_is_built(case, gpt2_bpe, run_dir, tmp_path):
    write, messages = CASES[case]
    stories = load_source(asset_path("stories260K/stories260K.bin"))  # a LLaMA of 5 blocks, 512 positions
    path = write(stories, gpt2_bpe, run_dir, tmp_path)
    result = execute("-m", "gptexp.commands.sample", f"source={path}", "max_new_tokens=4",
                     f"hydra.run.dir={tmp_path / 'out'}", timeout=120, memory_limit=LIMIT)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for message in messages:
        assert message in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
