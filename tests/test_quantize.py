"""Weight-only int8 / int4: the products equal a float layer holding the dequantized weights, the kernels read the
packed weights (never a float copy), a tied head and embedding stay one weight, a saved quantized model loads as
it was, and every command takes quantize=."""

import copy
import json
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_bad_input import in_process, one_line_error

from gptexp.core.config import ConfigError, asset_path
from gptexp.inference import kernels
from gptexp.inference.quantize import QuantizedEmbedding, QuantizedLinear, quantize, read_bytes_per_token, weight_bytes
from gptexp.models import GPT2, GPT2Config, Llama, LlamaConfig
from gptexp.weights import load_source, quantized

STORIES = str(asset_path("stories260K/stories260K.bin"))


def gpt2() -> GPT2:
    torch.manual_seed(0)
    return GPT2(GPT2Config(block_size=64, vocab_size=100, n_layer=2, n_head=2, n_embd=64)).eval()


def llama() -> Llama:
    torch.manual_seed(0)
    return Llama(LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, max_seq_len=64,
                             hidden_dim=128)).eval()


def dequantized_copy(model, quantized):
    """`model` with each linear weight replaced by what its quantized layer stands for: the float reference."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, QuantizedLinear):
                reference.get_submodule(name).weight.copy_(module.dequantized())
    return reference


@pytest.fixture(params=["gptexp", "aten"])
def products(request, monkeypatch) -> str:
    """Whose kernels the layers built in the test multiply with: gptexp's operators, or ATen's alone (GPTEXP_KERNELS=0,
    so that the fallback cannot rot)."""
    if request.param == "aten":
        monkeypatch.setenv("GPTEXP_KERNELS", "0")
    elif not kernels.available("int8_mm"):
        pytest.skip("gptexp's kernels are not built here (no C++ compiler or ninja)")
    return request.param


@pytest.mark.parametrize("build", [gpt2, llama])
@pytest.mark.parametrize("scheme, group_size", [("int8", None), ("int4", 32), ("int4", 64)])
def test_quantized_logits_equal_the_dequantized_float_model(build, scheme, group_size, products):
    model = build()
    quantized = quantize(copy.deepcopy(model), scheme, group_size or 128)
    layers = [m for m in quantized.modules() if isinstance(m, QuantizedLinear)]
    assert all((m.kernel is None) == (products == "aten") for m in layers if scheme == "int8")
    x = torch.randint(0, 100, (3, 17))
    reference = dequantized_copy(model, quantized)(x)[0]
    # float32 activations: int8's sums in another order, nothing more (1e-5 of logits of order 1); int4's kernels
    # take bf16 inputs (test_int4_products_round_only_their_inputs_to_bf16)
    assert (quantized(x)[0] - reference).abs().max().item() < (1e-5 if scheme == "int8" else 1e-2)
    # one token a row, as a decoding step feeds it (int4 on a CPU with AVX512-BF16: gptexp's one-row kernel)
    one = x[:1, :1]
    assert (quantized(one)[0] - dequantized_copy(model, quantized)(one)[0]).abs().max().item() < (
        1e-5 if scheme == "int8" else 1e-2)
    # and the quantization error itself is small against the float model's logits
    error = (quantized(x)[0] - model(x)[0]).abs().max().item()
    assert error < (0.02 if scheme == "int8" else 0.2), error


def test_int4_products_round_only_their_inputs_to_bf16():
    layer = QuantizedLinear.from_linear(nn.Linear(256, 40), "int4", 64)
    x = torch.randn(3, 256)
    reference = F.linear(x.bfloat16().float(), layer.dequantized().bfloat16().float(), layer.bias)
    assert (layer(x) - reference).abs().max().item() < 1e-2 * reference.abs().max().item()
    assert layer(x).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8, 13, 300])
@pytest.mark.parametrize("width", [192, 172])  # 172: stories260K's hidden width, no multiple of 64
def test_gptexps_int8_kernel_equals_atens(dtype, rows, width):
    layer = QuantizedLinear.from_linear(nn.Linear(width, 71), "int8").to(dtype)  # 71: a lone last channel
    x = torch.randn(rows, width, dtype=dtype)
    assert layer.kernel == "int8_mm"  # this machine builds it (a C++ compiler is at hand)
    # ATen in float32 (its bf16 kernel reads past rows of 172), on the same bf16-rounded scales
    aten = (torch.ops.aten._weight_int8pack_mm(x.float(), layer.qweight, layer.scales.float()) + layer.bias).to(dtype)
    # float32: the same sums in another order; bf16: one rounding of the output either way
    assert (layer(x).float() - aten.float()).abs().max().item() <= (1e-5 if dtype == torch.float32 else
                                                                   2e-2 * aten.abs().max().item())


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("width", [256, 768])
def test_gptexps_int4_kernel_for_one_row_equals_atens(group_size, width):
    layer = QuantizedLinear.from_linear(nn.Linear(width, 100), "int4", group_size)
    if layer.kernel != "int4_mv":
        pytest.skip("this CPU lacks AVX512-BF16: one row runs through ATen's kernel")
    x = torch.randn(1, width)
    aten = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), layer.packed, group_size,
                                                      layer.scales_and_zeros)[:, :100].float() + layer.bias
    # both round x, the scales and the zero points to bf16; the sums differ in order (ATen's output is bf16)
    assert (layer(x) - aten).abs().max().item() < 1e-2 * aten.abs().max().item()
    # against exact sums (float64) over the same bf16 numbers, the zero points meeting x's own sums
    s, z = layer.scales.bfloat16().double(), layer.zeros.bfloat16().double()
    w = ((layer.int4_values().double().view(100, -1, group_size) - 8) * s[..., None]).flatten(1)
    exact = x.bfloat16().double() @ w.t() + x.double().view(1, -1, group_size).sum(-1) @ z.t() + layer.bias
    assert (layer(x) - exact).abs().max().item() < 1e-5 * exact.abs().max().item()


def test_int8_is_per_output_channel_and_int4_group_wise():
    linear = nn.Linear(64, 48)
    q8 = QuantizedLinear.from_linear(linear, "int8")
    assert q8.qweight.dtype == torch.int8 and q8.scales.shape == (48,)
    assert q8.qweight.abs().amax(dim=1).eq(127).all()  # each row's largest weight uses the whole range
    q4 = QuantizedLinear.from_linear(linear, "int4", 32)
    assert q4.qweight.dtype == torch.uint8 and q4.qweight.shape == (48, 32)  # two values a byte
    assert q4.scales.shape == q4.zeros.shape == (48, 2)
    values = q4.int4_values()
    assert values.min() == 0 and values.max() == 15
    # each group's smallest and largest weight are represented (to rounding): the range spans the group
    groups = linear.weight.detach().view(48, 2, 32)
    assert torch.allclose(q4.dequantized().view(48, 2, 32).amin(-1), groups.amin(-1), atol=1e-6)
    assert torch.allclose(q4.dequantized().view(48, 2, 32).amax(-1), groups.amax(-1), atol=1e-6)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 4])
def test_the_product_reads_the_packed_weight_and_never_a_float_copy(scheme, rows):
    from torch.profiler import ProfilerActivity, profile

    layer = QuantizedLinear.from_linear(nn.Linear(256, 512, bias=False), scheme, 64)
    x = torch.randn(rows, 256)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        layer(x)
    ops = {e.key for e in prof.key_averages()}
    # gptexp's own operators where they apply (test_gptexps_int8_kernel_equals_atens, ..._int4_kernel_...)
    if scheme == "int4" and (rows > 1 or layer.kernel is None):
        assert "aten::_weight_int4pack_mm_for_cpu" in ops, ops
    elif layer.kernel is not None:
        assert f"gptexp::{layer.kernel}" in ops, ops
    assert not ops & {"aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::_to_copy"} - (
        {"aten::_to_copy"} if scheme == "int4" else set()), ops  # int4: only the input is made bf16
    # nothing the size of a float weight is allocated: at most the output and small temporaries
    biggest = max(e.cpu_memory_usage for e in prof.key_averages())
    assert biggest < 256 * 512 * 4 / 8, biggest


@pytest.mark.parametrize("build", [gpt2, lambda: Llama(LlamaConfig(dim=64, n_layers=1, n_heads=4, vocab_size=100,
                                                                   max_seq_len=32, hidden_dim=128,
                                                                   tie_embeddings=True))])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_tied_head_and_embedding_stay_one_quantized_weight(build, scheme):
    model = quantize(build(), scheme, 32)
    embedding = next(m for m in model.modules() if isinstance(m, QuantizedEmbedding))
    assert embedding.head[0] is model.lm_head
    idx = torch.tensor([[3, 7, 99]])
    assert torch.equal(embedding(idx)[0], model.lm_head.dequantized()[idx[0]])
    assert not [k for k in model.state_dict() if "wte" in k or "embed_tokens" in k]  # stored once, as the head


def test_an_untied_embedding_stays_as_it_was():
    model = quantize(llama(), "int8")
    assert type(model.model.embed_tokens) is nn.Embedding


def test_quantized_weights_are_smaller_and_the_bytes_read_a_token_count_the_kernels_layout():
    model = gpt2()
    before = read_bytes_per_token(model)
    q8, q4 = quantize(copy.deepcopy(model), "int8"), quantize(copy.deepcopy(model), "int4", 32)
    linear_weights = sum(m.weight.numel() for m in model.modules() if type(m) is nn.Linear)
    assert read_bytes_per_token(q8) < 0.3 * before and weight_bytes(q8) < weight_bytes(model)
    assert read_bytes_per_token(q4) < read_bytes_per_token(q8)
    assert read_bytes_per_token(q4) >= linear_weights / 2  # half a byte a weight, plus scales and zero points


@pytest.mark.parametrize("precision", [torch.float32, torch.bfloat16])
def test_moving_and_casting_repack_the_kernel_layout(precision):
    model = quantize(llama(), "int4", 32).to(precision)
    x = torch.randint(0, 100, (2, 9))
    layer = model.model.layers[0].mlp.down_proj
    assert layer.scales.dtype == precision and layer.scales_and_zeros.dtype == torch.bfloat16
    reference = copy.deepcopy(model).float()
    assert (model(x)[0].float() - reference(x)[0]).abs().max() < (1e-5 if precision == torch.float32 else 0.05)


def test_a_saved_quantized_model_loads_without_quantizing_again(tmp_path):
    source = load_source(STORIES)
    source.place("cpu", "fp32", "int8")
    path = tmp_path / "stories.int8.safetensors"
    quantized.write(source, path)
    loaded = load_source(str(path))
    loaded.place("cpu", "fp32")
    assert loaded.model.quantization == {"scheme": "int8", "group_size": None}
    for (name, a), b in zip(source.model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.randint(0, 512, (1, 12))
    assert torch.equal(loaded.model(x)[0], source.model(x)[0])
    assert loaded.tokenizer.encode("Once upon a time") == source.tokenizer.encode("Once upon a time")
    with pytest.raises(ConfigError, match="already quantized to int8"):
        load_source(str(path)).place("cpu", "fp32", "int4")


def test_a_saved_int4_gpt2_loads_with_its_tied_embedding(tmp_path):
    from gptexp.data.tokenizers import gpt2_tokenizer
    from gptexp.weights import Source

    source = Source(GPT2(GPT2Config(block_size=32, vocab_size=50257, n_layer=1, n_head=2, n_embd=64)).eval(),
                    gpt2_tokenizer(), "a tiny GPT-2")
    source.place("cpu", "bf16", "int4", 64)
    quantized.write(source, tmp_path / "m.safetensors")
    loaded = load_source(str(tmp_path / "m.safetensors")).model
    assert loaded.transformer.wte.head[0] is loaded.lm_head
    x = torch.randint(0, 50257, (1, 8))
    assert torch.equal(loaded(x)[0], source.model(x)[0]) and loaded(x)[0].dtype == torch.bfloat16


def test_quantizing_logs_its_time_and_sizes(caplog):
    with caplog.at_level("INFO", logger="gptexp.inference.quantize"):
        quantize(gpt2(), "int4", 32)
    assert "quantized 9 linear layers to int4 (groups of 32) in" in caplog.text and "MB ->" in caplog.text


def run(command: str, arguments: list[str], monkeypatch) -> None:
    """python -m gptexp <command> ..., in this process (a subprocess would spend seconds importing)."""
    monkeypatch.setattr(sys, "argv", [command, *arguments])
    runpy.run_module(f"gptexp.commands.{command}", run_name="__main__")


def test_sample_and_evaluate_take_quantize_and_export_writes_a_file_they_read(tmp_path, monkeypatch):
    greedy = ["temperature=0", "max_new_tokens=20", "prompt=Once upon a time"]
    run("sample", [f"source={STORIES}", "quantize=int8", *greedy, f"hydra.run.dir={tmp_path / 's'}"], monkeypatch)
    text = json.loads((tmp_path / "s" / "samples.jsonl").read_text())["completion"]
    run("export", ["format=quantized", "quantize=int8", f"source={STORIES}", f"output={tmp_path / 'q.safetensors'}"],
        monkeypatch)
    run("sample", [f"source={tmp_path / 'q.safetensors'}", *greedy, f"hydra.run.dir={tmp_path / 't'}"], monkeypatch)
    assert json.loads((tmp_path / "t" / "samples.jsonl").read_text())["completion"] == text
    story = Path(asset_path("tinystories_sample.txt")).read_text()[:4000]
    (tmp_path / "story.txt").write_text(story)
    run("evaluate", [f"source={tmp_path / 'q.safetensors'}", f"text={tmp_path / 'story.txt'}", "logger=none",
                     f"hydra.run.dir={tmp_path / 'e'}"], monkeypatch)
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    assert results["quantize"] == "int8" and 1 < results["perplexity"] < 20, results


@pytest.mark.parametrize("command, arguments, messages", [
    ("sample", ["quantize=int3"], ["quantize='int3': choose int8, int4 or nf4"]),
    ("sample", ["quantize=int4", "quantize_group_size=48"], ["quantize_group_size=48: the int4 kernels take groups of 32"]),
    ("sample", ["quantize=int4"], ["layer model.layers.0.self_attn.q_proj has 64 inputs, which groups of 128 do not "
                                   "divide", "choose a quantize_group_size that divides it"]),
    ("evaluate", ["quantize=int3"], ["quantize='int3': choose int8, int4 or nf4"]),
    ("export", ["format=quantized", "output=q.safetensors"], ["format=quantized needs quantize=int8 or quantize=int4"]),
    ("export", ["format=quantized", "quantize=int8", "output=q.bin"], ["a quantized model is one .safetensors file"]),
    ("sample", ["source=<junk>"], ["junk.safetensors is not a readable safetensors file", "export format=quantized"]),
    ("sample", ["source=<other>"], ["other.safetensors is not a quantized gptexp model"]),
])
def test_bad_quantize_settings_are_one_line(command, arguments, messages, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    files = tmp_path.parent / "files"  # outside the directory that must stay empty
    files.mkdir(exist_ok=True)
    (files / "junk.safetensors").write_text("junk")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(files / "other.safetensors"))
    arguments = [a.replace("<junk>", str(files / "junk.safetensors")).replace("<other>", str(files / "other.safetensors"))
                 for a in arguments]
    run_dir = [] if command == "export" else [f"hydra.run.dir={tmp_path / 'run'}"]  # export writes only its output
    status, stderr = in_process(command, [f"source={STORIES}", *arguments, *run_dir], monkeypatch, capfd)
    assert status == 2
    one_line_error(stderr, messages)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("field, value, message", [
    ("model", None, "its metadata has no 'model' field"),
    ("quantization", None, "its metadata has no 'quantization' field"),
    ("tokenizer", None, "its metadata has no 'tokenizer' field"),
    ("model", "{Llama", "its metadata's 'model' is not JSON (Expecting property name"),
    ("model", '"Llama"', "its metadata's 'model' must be a JSON object with class and config, found \"Llama\""),
    ("tokenizer", "[1]", "its metadata's 'tokenizer' must be a JSON object with kind, found [1]"),
    ("quantization", '{"scheme": "int3", "group_size": null}', "its metadata's 'quantization' holds "
                                                                '{"scheme": "int3", "group_size": null}, not a scheme'),
    ("template", "5", "its metadata's 'template' must be a template's name or null, found 5"),
])
def test_a_quantized_file_with_bad_metadata_is_one_line(field, value, message, tmp_path, monkeypatch, capfd):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    source = load_source(STORIES)
    source.place("cpu", "fp32", "int8")
    quantized.write(source, tmp_path / "good.safetensors")
    with safe_open(str(tmp_path / "good.safetensors"), "pt") as f:
        metadata = f.metadata()
    metadata = {k: v for k, v in (metadata | {field: value}).items() if v is not None}
    path = tmp_path / "bad.safetensors"
    save_file(load_file(str(tmp_path / "good.safetensors")), str(path), metadata=metadata)
    status, stderr = in_process("sample", [f"source={path}", f"hydra.run.dir={tmp_path / 'run'}"], monkeypatch, capfd)
    assert status == 2
    one_line_error(stderr, [f"{path}: {message}", "export the model again with python -m gptexp export "
                                                  "format=quantized"])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("width", [192, 172])
def test_with_gptexp_kernels_0_int8_runs_through_atens_kernel(width, monkeypatch):
    layer = QuantizedLinear.from_linear(nn.Linear(width, 70), "int8").to(torch.bfloat16)
    x = torch.randn(5, width, dtype=torch.bfloat16)
    ours = layer(x)
    monkeypatch.setenv("GPTEXP_KERNELS", "0")
    layer.pack()
    assert layer.kernel is None
    assert (layer(x).float() - ours.float()).abs().max().item() <= 2e-2 * ours.abs().max().item()


needs_kernels = pytest.mark.skipif(not kernels.available("int8_mm"), reason="gptexp's kernels are not built here")


@needs_kernels
@pytest.mark.parametrize("name, arguments, message", [
    ("int8_mm", lambda: (torch.randn(2, 5), torch.zeros(3, 4, dtype=torch.int8), torch.rand(3)), "shapes disagree"),
    ("int8_mm", lambda: (torch.randn(2, 4), torch.zeros(3, 4, dtype=torch.int8), torch.rand(4)), "shapes disagree"),
    ("int8_mm", lambda: (torch.randn(4), torch.zeros(3, 4, dtype=torch.int8), torch.rand(3)), "want x (M, K)"),
    ("int8_mm", lambda: (torch.randn(2, 4).double(), torch.zeros(3, 4, dtype=torch.int8), torch.rand(3)),
     "x must be float32 or bfloat16"),
    ("int8_mm", lambda: (torch.randn(2, 4), torch.zeros(3, 4), torch.rand(3)), "want int8 w"),
    ("int4_mv", lambda: (torch.randn(256), torch.zeros(3, 100, dtype=torch.uint8), torch.zeros(3, 4, 2).bfloat16(), 64),
     "shapes disagree"),
    ("int4_mv", lambda: (torch.randn(200), torch.zeros(3, 100, dtype=torch.uint8), torch.zeros(3, 4, 2).bfloat16(), 50),
     "group size must be"),
    ("int4_mv", lambda: (torch.randn(256), torch.zeros(3, 128, dtype=torch.uint8), torch.zeros(3, 4, 2), 64),
     "bfloat16 scale_zero"),
])
def test_the_operators_refuse_wrong_shapes_and_dtypes_by_name(name, arguments, message):
    if not kernels.available(name):
        pytest.skip(f"gptexp::{name} is not built for this CPU")
    with pytest.raises(RuntimeError, match=re.escape(message)):
        getattr(torch.ops.gptexp, name)(*arguments())


@needs_kernels
def test_the_operators_pass_torchs_opcheck():
    """Schema, fake (meta) kernel and dispatch, as torch.library.opcheck checks a custom operator."""
    layer = QuantizedLinear.from_linear(nn.Linear(256, 40), "int8")
    for x in (torch.randn(3, 256), torch.randn(1, 256).bfloat16()):
        torch.library.opcheck(torch.ops.gptexp.int8_mm.default, (x, layer.qweight, layer.scales32))
    if kernels.available("int4_mv"):
        layer = QuantizedLinear.from_linear(nn.Linear(256, 40), "int4", 64)
        torch.library.opcheck(torch.ops.gptexp.int4_mv.default, (torch.randn(256), layer.qweight,
                                                                 layer.scale_zero_pairs, 64))


@needs_kernels
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_torch_compile_traces_a_quantized_model_through_the_operators(scheme):
    if scheme == "int4" and not kernels.available("int4_mv"):
        pytest.skip("this CPU lacks AVX512-BF16: one row runs through ATen's kernel")
    torch.manual_seed(0)  # widths that are multiples of 128, which the one-row int4 kernel takes
    model = quantize(GPT2(GPT2Config(block_size=64, vocab_size=100, n_layer=2, n_head=2, n_embd=128)).eval(), scheme, 64)
    used = {m.kernel for m in model.modules() if isinstance(m, QuantizedLinear)}
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # the operators' fake kernels give shapes
    for x in (torch.randint(0, 100, (2, 9)), torch.randint(0, 100, (1, 1))):
        with torch.no_grad():
            assert torch.equal(compiled(x)[0], model(x)[0])
    assert used - {None}, used
