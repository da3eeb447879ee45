"""GGUF, llama.cpp's file. Written by export format=gguf and read back by transformers' GGUF loader (an independent
reader), it gives gptexp's logits and tokenizes as gptexp does, for GPT-2 and LLaMA; read as source= it is the same
model (f32: the same logits); a file or a request gptexp cannot serve is one line."""

import os
import runpy
import sys

import pytest
import torch
from test_bad_input import in_process, one_line_error

from gptexp.core.config import asset_path
from gptexp.data.tokenizers import gpt2_tokenizer
from gptexp.models import GPT2, GPT2Config
from gptexp.weights import Source, load_source, save_hf
from training import execute

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
STORIES = str(asset_path("stories260K/stories260K.bin"))
TEXTS = ["Once upon a time, there was a little girl named Lily.", "Hello world, it's 2026!  Ünïcode\n\ttabs"]


def export(tmp_path, monkeypatch, source: str, dtype: str):
    path = tmp_path / f"model-{dtype}.gguf"
    monkeypatch.setattr(sys, "argv", ["export", "format=gguf", f"dtype={dtype}", f"source={source}", f"output={path}"])
    runpy.run_module("gptexp.commands.export", run_name="__main__")
    return path


def read_back(path):
    """transformers' model and tokenizer from the GGUF file alone."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    return model, transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A random GPT-2 on GPT-2's BPE, as an HF directory gptexp reads (1,024 positions: transformers' GGUF loader
    sizes GPT-2's position table from its default, not from the file)."""
    torch.manual_seed(0)
    model = GPT2(GPT2Config(block_size=1024, n_layer=2, n_head=2, n_embd=64)).eval()
    directory = tmp_path_factory.mktemp("gpt2")
    save_hf(model, directory)
    return model, directory


# how far transformers' logits from the file may be from gptexp's, as a share of the largest (measured: GPT-2 2e-7
# and 7e-3 in q8_0; stories260K 0, 6e-4, 2e-2 and 0.17, whose widths of 64 and 172 leave little to average)
@pytest.mark.parametrize("dtype, tolerance", [("f32", 1e-5), ("q8_0", 2e-2)])
@torch.inference_mode()
def test_gpt2_in_gguf_reads_back_as_gptexps_logits_and_tokens(dtype, tolerance, tiny_gpt2, tmp_path, monkeypatch):
    model, directory = tiny_gpt2
    path = export(tmp_path, monkeypatch, str(directory), dtype)
    theirs, tokenizer = read_back(path)
    x = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = model(x)[0]
    assert (theirs(x).logits - ours).abs().max().item() <= tolerance * ours.abs().max().item()
    for text in TEXTS:  # the vocabulary and the merges rebuilt from tiktoken's ranks tokenize as tiktoken does
        assert tokenizer(text)["input_ids"] == gpt2_tokenizer().encode(text)


@pytest.mark.parametrize("dtype, tolerance", [("f32", 1e-5), ("f16", 2e-3), ("q8_0", 5e-2), ("q4_0", 0.3)])
@torch.inference_mode()
def test_llama_in_gguf_reads_back_as_gptexps_logits_and_tokens(dtype, tolerance, tmp_path, monkeypatch):
    path = export(tmp_path, monkeypatch, STORIES, dtype)
    theirs, tokenizer = read_back(path)
    source = load_source(STORIES)
    x = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = source.model.eval()(x)[0]
    assert (theirs(x).logits - ours).abs().max().item() <= tolerance * ours.abs().max().item()
    # SentencePiece's pieces, scores and types: BOS, then the same pieces. Runs of spaces excepted: tok512.model's
    # normalizer collapses them, and GGUF has no field for a normalizer (llama.cpp reads Meta's, which keeps them)
    for text in [t.replace("  ", " ") for t in TEXTS]:
        assert tokenizer(text)["input_ids"] == [source.tokenizer.bos_id, *source.tokenizer.encode(text)]
    # the file against float32's 4 bytes a weight (measured 1.01, 0.52, 0.33, 0.23: norms stay f32, and the 172-wide
    # rows that no block of 32 divides f16), plus the tokenizer and metadata
    share = {"f32": 1.0, "f16": 0.52, "q8_0": 0.34, "q4_0": 0.24}[dtype]
    assert path.stat().st_size < share * 4 * source.model.num_parameters() + 20_000


@pytest.mark.parametrize("arguments, messages", [
    (["dtype=q5_k"], ["dtype='q5_k': format=gguf writes f32, f16, q8_0, q4_0"]),
    (["output=<dir>/model.bin"], ["a GGUF model is one .gguf file; name it <name>.gguf"]),
    (["source=<char run>"], ["tokenizer (char", "neither GPT-2's BPE nor SentencePiece",
                             "a character-level model has no GGUF tokenizer"]),
])
def test_export_gguf_refuses_bad_input_in_one_line(arguments, messages, run_dir, tmp_path, monkeypatch, capfd):
    given = {"source": STORIES, "output": str(tmp_path / "model.gguf")}
    for argument in arguments:
        key, value = argument.split("=", 1)
        given[key] = value.replace("<dir>", str(tmp_path)).replace("<char run>", str(run_dir))
    status, stderr = in_process("export", ["format=gguf", *(f"{k}={v}" for k, v in given.items())], monkeypatch, capfd)
    assert status == 2
    one_line_error(stderr, messages)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))  # nothing left behind


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """stories260K and a random GPT-2 (64 positions) written in f32 and q4_0 by gptexp's writer."""
    from gptexp.weights import gguf

    directory = tmp_path_factory.mktemp("gguf")
    torch.manual_seed(0)
    gpt2 = GPT2(GPT2Config(block_size=64, n_layer=2, n_head=2, n_embd=64)).eval()
    models = {"llama": load_source(STORIES), "gpt2": Source(gpt2, gpt2_tokenizer(), "a random GPT-2")}
    paths = {}
    for name, source in models.items():
        for dtype in ("f32", "q4_0"):
            paths[name, dtype] = directory / f"{name}-{dtype}.gguf"
            gguf.write(source.model, source.tokenizer, paths[name, dtype], dtype)
    return {name: source.model for name, source in models.items()}, paths


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@torch.inference_mode()
def test_a_gguf_file_is_a_source_with_the_same_logits_and_tokens(name, written):
    models, paths = written
    read = load_source(str(paths[name, "f32"]))
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(read.model(x)[0], models[name].eval()(x)[0])  # f32: the same weights, the same layout
    original = gpt2_tokenizer() if name == "gpt2" else load_source(STORIES).tokenizer
    for text in [t.replace("  ", " ") for t in TEXTS]:
        assert read.tokenizer.encode(text) == original.encode(text)
    quantized = load_source(str(paths[name, "q4_0"])).model  # dequantized on load: near, not equal
    difference = (quantized(x)[0] - models[name](x)[0]).abs().max().item()
    assert 0 < difference < 0.5 * models[name](x)[0].abs().max().item()


def test_sample_and_export_take_a_gguf_source(written, tmp_path, monkeypatch):
    _, paths = written
    monkeypatch.setattr(sys, "argv", ["sample", f"source={paths['llama', 'q4_0']}", "prompt=Once upon a time",
                                      "max_new_tokens=12", "temperature=0", f"hydra.run.dir={tmp_path / 's'}"])
    runpy.run_module("gptexp.commands.sample", run_name="__main__")
    assert (tmp_path / "s" / "samples.jsonl").read_text().count("completion") == 1
    monkeypatch.setattr(sys, "argv", ["export", "format=hf", f"source={paths['gpt2', 'f32']}",
                                      f"output={tmp_path / 'hf'}"])
    runpy.run_module("gptexp.commands.export", run_name="__main__")
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def foreign_gguf(path, architecture: str, tensor_type=None):
    """A GGUF file gptexp's writer would not write: another architecture, or a tensor of another type."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    kind = tensor_type or gguf.GGMLQuantizationType.F32
    block, size = gguf.GGML_QUANT_SIZES[kind]
    data = (np.zeros((4, 256), dtype=np.float32) if kind == gguf.GGMLQuantizationType.F32
            else np.zeros((4, 256 // block * size), dtype=np.uint8))
    writer.add_tensor("token_embd.weight", data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("case, messages", [
    ("truncated", ["is not a readable GGUF file", "truncated, or not GGUF"]),
    ("mamba", ["holds a 'mamba' model; gptexp reads GGUF's gpt2 and llama architectures"]),
    ("Q8_K", ["tensor token_embd.weight is Q8_K, which gptexp cannot dequantize"]),
    ("no metadata", ["lacks what a llama model needs: llama.context_length, llama.embedding_length"]),
])
def test_a_gguf_gptexp_cannot_read_is_one_line(case, messages, written, tmp_path, monkeypatch, capfd):
    import gguf

    _, paths = written
    path = tmp_path / f"{case}.gguf"
    if case == "truncated":
        path.write_bytes(paths["llama", "f32"].read_bytes()[:300_000])
    else:  # a llama's embedding alone: its metadata missing
        foreign_gguf(path, *{"mamba": ("mamba",), "Q8_K": ("llama", gguf.GGMLQuantizationType.Q8_K),
                             "no metadata": ("llama",)}[case])
    status, stderr = in_process("sample", [f"source={path}", f"hydra.run.dir={tmp_path / 'out'}"], monkeypatch, capfd)
    assert status == 2
    one_line_error(stderr, messages)
    assert not (tmp_path / "out").exists()


def test_a_gguf_file_is_a_finetuning_base(written, tmp_path, monkeypatch):
    """model.checkpoint=<file.gguf> (GPT-2: model.pretrained=): the model and (for a LLaMA, as a file in gptexp's
    cache) the tokenizer come from the file; a short LoRA run on it lowers the loss."""

    from hydra import compose, initialize_config_dir

    from gptexp.core.config import CONF_DIR
    from gptexp.data.tokenizers import load_tokenizer
    from gptexp.weights import pretrained
    from training import column, metrics

    monkeypatch.setenv("GPTEXP_CACHE", str(tmp_path / "cache"))
    originals, paths = written
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    for name, config, key in (("gpt2", "gpt2", "pretrained"), ("llama", "llama2", "checkpoint")):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("train", overrides=[f"model={config}", f"model.{key}={paths[name, 'f32']}"])
        location = pretrained.weights_location(cfg.model)
        tokenizer = load_tokenizer(pretrained.tokenizer(cfg.model, location))
        built = pretrained.build(cfg.model, tokenizer.vocab_size, location).eval()
        with torch.inference_mode():
            assert torch.equal(built(x)[0], originals[name](x)[0])
        assert tokenizer.encode(TEXTS[0]) == load_source(str(paths[name, "f32"])).tokenizer.encode(TEXTS[0])
    assert not (tmp_path / "cache" / "tokenizers").exists()  # the file's tokenizer travels as an object, not a file

    result = execute("train.py", "model=llama2", f"model.checkpoint={paths['llama', 'q4_0']}",
                     "finetune=lora", "data=tinystories", "data.source=bundled", "data.seq_len=64",
                     "data.batch_size=8", "trainer.max_steps=8", "trainer.val_check_interval=8",
                     "trainer.limit_val_batches=4", "optim.lr=1e-2", "logger=csv",
                     "callbacks.samples.max_new_tokens=4", f"hydra.run.dir={tmp_path / 'run'}",
                     env=os.environ | {"GPTEXP_CACHE": str(tmp_path / "cache")}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [loss for _, loss in column(metrics(tmp_path / "run"), "val/loss")]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("model, key, held, message", [
    ("gpt2", "pretrained", "llama", "holds a Llama, not a GPT2; use model=llama2"),
    ("llama2_260k", "checkpoint", "gpt2", "holds a GPT2, not a Llama; use model=gpt2"),
])
def test_a_gguf_base_of_another_architecture_is_one_line(model, key, held, message, written, tmp_path, monkeypatch,
                                                         capfd):
    _, paths = written
    status, stderr = in_process("train.py", [f"model={model}", f"model.{key}={paths[held, 'f32']}",
                                             "data.seq_len=32", "logger=csv", f"hydra.run.dir={tmp_path / 'run'}"],
                                monkeypatch, capfd)
    assert status == 2
    one_line_error(stderr, [f"model.{key}={paths[held, 'f32']} {message}"])
    assert not (tmp_path / "run").exists()


def llama_cpp_greedy(path, prompt_ids: list[int], steps: int):
    """llama.cpp's greedy continuation of `prompt_ids` from the file (float32 KV cache), and its logits each step."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt_ids) + steps, logits_all=True, verbose=False,
                          n_threads=2, type_k=0, type_v=0)  # 0: GGML_TYPE_F32, not llama.cpp's default f16 cache
    try:
        llm.eval(prompt_ids)
        chosen, logits = [], []
        for _ in range(steps):
            logits.append(torch.tensor(llm.scores[llm.n_tokens - 1]))
            chosen.append(int(logits[-1].argmax()))
            llm.eval(chosen[-1:])
        return chosen, torch.stack(logits)
    finally:
        llm.close()


@pytest.mark.parametrize("name, dtype", [("llama", "f32"), ("llama", "q8_0"), ("gpt2", "f32")])
@torch.inference_mode()
def test_llama_cpp_reads_the_file_and_decodes_as_gptexp_does(name, dtype, written, tmp_path):
    """llama.cpp itself (llama-cpp-python, built from source; skipped where it is not installed) on the exported file:
    it tokenizes as gptexp does, and its greedy text equals gptexp's on the same weights (the file read back). In
    q8_0 llama.cpp also rounds the activations to 8 bits for its products, so its logits move by up to ~0.3 and the
    texts part at the first near-tie (measured: after 131 of 200 tokens, where gptexp's top two logits were 0.036
    apart); past the first 100 tokens each of its choices must be gptexp's or within 0.1 of it."""
    from gptexp.weights import gguf

    models, paths = written
    path = paths.get((name, dtype)) or tmp_path / f"{name}-{dtype}.gguf"
    if not path.exists():
        gguf.write(models[name], load_source(STORIES).tokenizer, path, dtype)
    source = load_source(str(path))
    tokenizer, model = source.tokenizer, source.model
    prompt = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode("Once upon a time")
    steps = min(200, model.context_length) - len(prompt)  # GPT-2's context here: 64
    chosen, theirs = llama_cpp_greedy(path, prompt, steps)
    ours = model(torch.tensor([prompt + chosen]))[0][0, len(prompt) - 1:-1]  # gptexp on llama.cpp's sequence
    vocab = model.config.vocab_size
    if dtype == "f32":
        # measured: 2e-5 of 12 for stories260K, 1.2e-4 of 1.2 for GPT-2 (ggml's GELU reads a table of f16 values)
        assert (theirs[:, :vocab] - ours).abs().max() <= 1e-3 * ours.abs().max()
        assert chosen == ours.argmax(-1).tolist()
    else:
        assert chosen[:100] == ours[:100].argmax(-1).tolist()
        picked = ours.gather(1, torch.tensor(chosen)[:, None])[:, 0]
        assert (ours.max(-1).values - picked).max() <= 0.1
    import llama_cpp

    vocabulary_check = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in TEXTS[:1] if name == "llama" else TEXTS:
            assert vocabulary_check.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text)
    finally:
        vocabulary_check.close()


def test_the_decode_bench_runs_llama_cpp_beside_gptexps_quantized_rows(tmp_path):
    """bench's llama.cpp rows (llama-cpp-python, where installed): the same GPT-2 as q8_0 and q4_0 GGUF, batch 1,
    interleaved with gptexp's int8 and int4 and compared with them."""
    pytest.importorskip("llama_cpp")
    import csv

    result = execute("-m", "gptexp", "bench", "preset=decode", "preset.generate.gpt2_124m.model.n_layer=1",
                     "preset.generate.gpt2_124m.model.n_head=2", "preset.generate.gpt2_124m.model.n_embd=128",
                     "preset.generate.gpt2_124m.new_tokens=8", "preset.generate.gpt2_124m.batch=[1,2]",
                     "precision=[fp32]", "impls=[gptexp]", "repeats=1", "warmup=0", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {(r["impl"], r["precision"], r["batch"]): r for r in csv.DictReader(open(tmp_path / "bench.csv"))}
    assert {key for key in rows if key[0] == "llama.cpp"} == {("llama.cpp", "q8_0", "1"), ("llama.cpp", "q4_0", "1")}
    for theirs, ours in (("q8_0", "int8"), ("q4_0", "int4")):
        row = rows["llama.cpp", theirs, "1"]
        assert float(row["tokens_per_s"]) > 0 and 0 < float(row["of_bound"]) < 1
        assert f"gptexp {ours} " in result.stdout and f"against llama.cpp {theirs} " in result.stdout
    read = {dtype: float(rows["llama.cpp", dtype, "1"]["weight_mb_per_step"]) for dtype in ("q8_0", "q4_0")}
    assert read["q4_0"] < read["q8_0"]
